"""Shard reading for N ranks x M loader workers: every sample once per epoch, the same step
count on every rank whatever the shard layout, eval splits exactly once, damaged data skipped and counted, and
the augmentations built from torchvision's functional ops (the batched blur checked against torchvision's).

Ranks are passed explicitly (torch.distributed is never initialised in this process); the loader workers are
real DataLoader processes. One test runs two real gloo ranks that all_reduce after every step: a rank with
fewer batches would hang it (caught by the timeout of tests/dist_utils.py).
"""

import io
import logging
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from dist_utils import run_on_ranks
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from brcd_dist.data import augment, eval_batches, load_manifest, train_batches, write_shards
from brcd_dist.data.epoch_plan import batch_sizes, plan_epoch, rank_count, steps_per_epoch
from brcd_dist.data.manifest import file_sha256, save_manifest, shard_url
from brcd_dist.storage import ShardIntegrityError

FMNIST = "/usr/share/datasets/fashion-mnist"
# 230 train images in 5 shards (50, 50, 50, 50, 30): over 2 ranks one reads 3 shards, the other 2.
SHARDS = dict(train_per_class=23, samples_per_shard=50, max_images=600, val_fraction=0.5, progress=False)
LOADER = dict(image_size=32, in_chans=1)

pytestmark = pytest.mark.skipif(
    not Path(FMNIST, "train-images-idx3-ubyte.gz").is_file(), reason="apt-get install dataset-fashion-mnist"
)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"), "fashion_mnist", FMNIST, seed=0, **SHARDS)


def epoch_on_ranks(manifest, split, world_size, *, batch_size=16, num_workers=2, epoch=0, **kw):
    """Run every rank's epoch one after the other: (len() per rank, batches per rank, stats per rank)."""
    lens, batches, stats = [], [], []
    for rank in range(world_size):
        it = train_batches(
            manifest,
            split,
            rank=rank,
            world_size=world_size,
            batch_size=batch_size,
            num_workers=num_workers,
            epoch=epoch,
            seed=0,
            **LOADER,
            **kw,
        )
        lens.append(len(it))
        batches.append(list(it))
        stats.append(it.stats)
    return lens, batches, stats


def eval_on_ranks(manifest, split, world_size, *, batch_size=64, num_workers=2, **kw):
    out = []
    for rank in range(world_size):
        out.append(
            list(
                eval_batches(
                    manifest,
                    split,
                    rank=rank,
                    world_size=world_size,
                    batch_size=batch_size,
                    num_workers=num_workers,
                    **LOADER,
                    **kw,
                )
            )
        )
    return out


def keys_of(batches):
    return [k for b in batches for k in b["key"]]


# ----------------------------------------------------------------------------- the epoch plan (pure)

LAYOUTS = [
    ([50, 50, 50, 50, 30], 2),
    ([34, 33, 33], 3),
    ([7, 7, 7, 7, 6], 4),
    ([1000, 1000, 600], 3),
    ([5] * 9, 2),
    ([64] * 8, 8),
]


@pytest.mark.parametrize("counts,world", LAYOUTS)
def test_plan_gives_each_sample_position_to_exactly_one_rank(counts, world):
    for epoch in (0, 1):
        plan = plan_epoch(counts, world, epoch=epoch, seed=3)
        taken = Counter((p.shard, pos) for parts in plan for p in parts for pos in range(p.count))
        assert sorted(taken) == [(s, i) for s, c in enumerate(counts) for i in range(c)]
        assert set(taken.values()) == {1}
        assert all(p.count == counts[p.shard] for parts in plan for p in parts)


@pytest.mark.parametrize("counts,world", LAYOUTS)
@pytest.mark.parametrize("batch", [2, 16, 64])
def test_every_rank_gets_the_same_number_of_non_empty_batches(counts, world, batch):
    plan = plan_epoch(counts, world, epoch=1, seed=0)
    steps = steps_per_epoch(plan, batch)
    for parts in plan:
        sizes = batch_sizes(rank_count(parts), steps, batch)
        assert len(sizes) == steps and sum(sizes) == rank_count(parts)
        assert min(sizes) >= 1 and max(sizes) <= batch and max(sizes) - min(sizes) <= 1


def test_at_64_ranks_every_shard_is_read_by_one_rank():
    """ImageNet's 100k train subset at 64 ranks x 6 loader workers. Shards cut for 384 readers
    (make_shards) give every rank whole shards, 6 of them, and no shard to two ranks."""
    from brcd_dist.data.shards import shard_sizes

    counts = shard_sizes(100_000, 2000, 64 * 6)
    for epoch in (0, 1):
        plan = plan_epoch(counts, 64, epoch=epoch, seed=0)
        shards = [p.shard for parts in plan for p in parts]
        assert sorted(shards) == list(range(len(counts)))  # each shard once, on one rank
        assert {len(parts) for parts in plan} == {6}


def test_a_train_plan_with_fewer_shards_than_ranks_is_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"50 shards .* 64 ranks .*data.shard_readers >= 64"):
        plan_epoch([2000] * 50, 64, epoch=0, seed=0)


def test_an_eval_plan_gives_whole_shards_even_to_fewer_ranks_than_shards():
    plan = plan_epoch([10, 10, 10], 5, shuffle=False)
    assert sorted(len(parts) for parts in plan) == [0, 0, 1, 1, 1]
    assert sorted(p.shard for parts in plan for p in parts) == [0, 1, 2]


def test_plan_is_a_pure_function_of_epoch_and_seed():
    counts = [50, 50, 50, 50, 30, 20, 10]
    assert plan_epoch(counts, 3, epoch=2, seed=1) == plan_epoch(counts, 3, epoch=2, seed=1)
    assert plan_epoch(counts, 3, epoch=2, seed=1) != plan_epoch(counts, 3, epoch=3, seed=1)
    assert plan_epoch(counts, 3, shuffle=False) == plan_epoch(counts, 3, epoch=9, shuffle=False)


def test_max_steps_caps_steps_and_keeps_batches_full():
    plan = plan_epoch([50] * 4, 2)
    assert steps_per_epoch(plan, 16, max_steps=3) == 3
    assert batch_sizes(rank_count(plan[0]), 3, 16) == [16, 16, 16]


# ----------------------------------------------------------------------------- training batches


def test_two_ranks_two_workers_read_every_train_key_once_per_epoch_in_equal_steps(manifest):
    split = manifest.splits["train"]
    assert split.shard_counts == [50, 50, 50, 50, 30]
    orders = []
    for epoch in (0, 1):
        lens, batches, stats = epoch_on_ranks(manifest, "train", 2, epoch=epoch)
        orders.append(keys_of(batches[0]))
        per_rank = [keys_of(b) for b in batches]
        assert lens[0] == lens[1] == len(batches[0]) == len(batches[1])  # same steps on both ranks
        assert len(per_rank[0]) != len(per_rank[1])  # although the ranks hold different sample counts
        assert all(len(b["key"]) >= 1 for bs in batches for b in bs)
        every = per_rank[0] + per_rank[1]
        assert sorted(every) == sorted(split.keys) and len(set(every)) == len(every)
        assert all(s.skipped == 0 and s.padded_steps == 0 for s in stats)
    assert orders[0] != orders[1]  # each epoch reshuffled


def test_train_batches_carry_two_views_keys_and_labels(manifest):
    _, batches, _ = epoch_on_ranks(manifest, "train", 1, batch_size=32, num_workers=1, max_steps=2)
    label_of = dict(zip(manifest.splits["train"].keys, manifest.splits["train"].labels))
    for b in batches[0]:
        assert b["view1"].shape == b["view2"].shape == (32, 1, 32, 32) and b["view1"].dtype == torch.float32
        assert b["label"].dtype == torch.long and b["label"].tolist() == [label_of[k] for k in b["key"]]
        assert not torch.equal(b["view1"], b["view2"])
        assert -1.0 <= b["view1"].min() and b["view1"].max() <= 1.0  # [0, 1] normalised by 0.5/0.5


def test_max_steps_stops_the_epoch_early(manifest):
    lens, batches, _ = epoch_on_ranks(manifest, "train", 2, batch_size=16, max_steps=3)
    assert lens == [3, 3] and [len(b) for b in batches] == [3, 3]
    assert all(len(b["key"]) == 16 for bs in batches for b in bs)


def test_more_ranks_than_shards_is_refused_before_any_shard_is_read(manifest):
    """Each rank reading every shard (the old strided fallback) would multiply reading by the world size."""
    with pytest.raises(ValueError, match="data.shard_readers >= 7"):
        train_batches(manifest, "train", rank=0, world_size=7, batch_size=8, num_workers=0, epoch=0, seed=0, **LOADER)


def test_views_depend_on_key_and_epoch_not_on_which_rank_read_them(manifest):
    def views(world, epoch):
        _, batches, _ = epoch_on_ranks(manifest, "train", world, batch_size=64, num_workers=0, epoch=epoch)
        return {k: (b["view1"][i], b["view2"][i]) for bs in batches for b in bs for i, k in enumerate(b["key"])}

    one, two, later = views(1, 0), views(2, 0), views(1, 1)
    for key in list(one)[:20]:
        assert torch.equal(one[key][0], two[key][0]) and torch.equal(one[key][1], two[key][1])
        assert not torch.equal(one[key][0], later[key][0])


def test_reading_in_the_main_process_leaves_torch_rng_alone(manifest):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    epoch_on_ranks(manifest, "train", 1, num_workers=0, max_steps=2)
    assert torch.equal(torch.get_rng_state(), state)
    assert not dist.is_initialized()


def test_bad_rank_or_split_is_refused(manifest):
    with pytest.raises(ValueError, match="rank=2"):
        train_batches(manifest, "train", rank=2, world_size=2, batch_size=8, num_workers=0, epoch=0, seed=0, **LOADER)
    with pytest.raises(ValueError, match="'nope'"):
        eval_batches(manifest, "nope", rank=0, world_size=1, batch_size=8, num_workers=0, **LOADER)


def _gloo_epoch(rank, world_size, shards_dir):
    """One training epoch on a real gloo rank, an all_reduce after every step (as a DDP/DeepSpeed step does)."""
    m = load_manifest(shards_dir)
    keys, steps = [], 0
    for batch in train_batches(
        m, "train", rank=rank, world_size=world_size, batch_size=16, num_workers=0, epoch=0, seed=0, **LOADER
    ):
        t = torch.tensor([float(len(batch["key"]))])
        dist.all_reduce(t)
        keys += batch["key"]
        steps += 1
    return steps, keys


def test_real_gloo_ranks_step_together_over_uneven_shards(manifest):
    outcomes = run_on_ranks(_gloo_epoch, 2, args=(manifest.shards_dir,), timeout=120)
    (s0, k0), (s1, k1) = [o.unwrap() for o in outcomes]
    assert s0 == s1 and len(k0) != len(k1)
    assert sorted(k0 + k1) == sorted(manifest.splits["train"].keys)


# ----------------------------------------------------------------------------- eval batches


def test_eval_split_is_read_exactly_once_across_two_ranks_two_workers(manifest):
    split = manifest.splits["database"]
    per_rank = eval_on_ranks(manifest, "database", 2)
    every = keys_of(per_rank[0]) + keys_of(per_rank[1])
    assert sorted(every) == sorted(split.keys) and len(set(every)) == len(every)
    label_of = dict(zip(split.keys, split.labels))
    assert all(b["label"].tolist() == [label_of[k] for k in b["key"]] for bs in per_rank for b in bs)
    assert per_rank[0][0]["image"].shape == (64, 1, 32, 32)


def test_eval_images_are_deterministic_and_resized(manifest):
    (first,) = eval_on_ranks(manifest, "val_query", 1, num_workers=0)
    (again,) = eval_on_ranks(manifest, "val_query", 1, num_workers=1)
    assert keys_of(first) == keys_of(again)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(first, again))
    # the first image against a plain bilinear resize of the stored 28x28 PNG
    name = manifest.splits["val_query"].shards[0]
    with tarfile.open(Path(manifest.shards_dir) / name) as tar:
        png = tar.extractfile(f"{first[0]['key'][0]}.png").read()
    ref = TF.to_dtype(TF.pil_to_tensor(TF.resize(Image.open(io.BytesIO(png)), [32, 32])), torch.float32, scale=True)
    assert torch.allclose(first[0]["image"][0], (ref - 0.5) / 0.5, atol=1e-6)


# ----------------------------------------------------------------------------- URLs


def test_shard_urls_from_local_s3_http_and_pipe_bases():
    assert shard_url("a-000001.tar", "/d") == "/d/a-000001.tar"
    assert shard_url("a.tar", "/d", "s3://b/p/") == "s3://b/p/a.tar"
    assert shard_url("a.tar", "/d", "https://h/x") == "https://h/x/a.tar"
    assert shard_url("a.tar", "/d", "pipe:gsutil cat gs://b/{shard}") == "pipe:gsutil cat gs://b/a.tar"
    with pytest.raises(ValueError, match="shard"):
        shard_url("a.tar", "/d", "pipe:cat /x")


def test_reading_through_a_pipe_url_gives_the_same_split(manifest):
    url = f"pipe:cat {manifest.shards_dir}/{{shard}}"
    (piped,) = eval_on_ranks(manifest, "test_query", 1, num_workers=1, shards_url=url)
    assert keys_of(piped) == manifest.splits["test_query"].keys


# ----------------------------------------------------------------------------- damaged data


def _rewrite_with_garbage_png(path: Path, victim: int) -> str:
    """Replace the PNG of the victim-th sample of a shard with bytes that are no image; returns its key."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    pngs = [m.name for m, _ in members if m.name.endswith(".png")]
    target = pngs[victim]
    with tarfile.open(path, "w") as tar:
        for m, data in members:
            data = b"not a png at all" if m.name == target else data
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    return target.split(".")[0]


def _intact_keys(path: Path) -> list[str]:
    """Reference: samples of a (possibly truncated) shard whose label and PNG both read and decode."""
    files: dict[str, dict] = {}
    try:
        with tarfile.open(path, "r|") as tar:
            for m in tar:
                data = tar.extractfile(m).read()
                key, ext = m.name.split(".", 1)
                files.setdefault(key, {})[ext] = data
    except tarfile.TarError:
        pass
    good = []
    for key, f in files.items():
        try:
            Image.open(io.BytesIO(f["png"])).load()
            int(f["cls"])
            good.append(key)
        except Exception:
            pass
    return good


@pytest.fixture()
def damaged(manifest, tmp_path):
    """A copy of the shards with one undecodable sample in train shard 0 and train shard 3 cut in half."""
    out = tmp_path / "damaged"
    shutil.copytree(manifest.shards_dir, out)
    split = manifest.splits["train"]
    bad_key = _rewrite_with_garbage_png(out / split.shards[0], victim=7)
    cut = out / split.shards[3]
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2 + 700])  # mid-member
    intact = set()
    for name in split.shards:
        intact |= set(_intact_keys(out / name))
    assert bad_key not in intact and len(intact) < split.count - 20
    # damaged when written: the manifest holds these files' hashes (a shard changed after it is a different
    # failure, refused outright: test_a_shard_changed_after_its_manifest_stops_the_pass_naming_it)
    m = load_manifest(out)
    for name in (split.shards[0], split.shards[3]):
        m.sha256[name] = file_sha256(out / name)
    save_manifest(m, out)
    return load_manifest(out), intact


def test_a_shard_changed_after_its_manifest_stops_the_pass_naming_it(manifest, tmp_path):
    out = tmp_path / "changed"
    shutil.copytree(manifest.shards_dir, out)
    name = manifest.splits["test_query"].shards[1]
    _rewrite_with_garbage_png(out / name, victim=3)
    with pytest.raises(ShardIntegrityError, match=f"{name}: sha256"):
        eval_on_ranks(load_manifest(out), "test_query", 1, num_workers=0)


def test_damaged_train_data_is_skipped_counted_and_steps_stay_equal(damaged, caplog):
    m, intact = damaged
    with caplog.at_level(logging.WARNING, logger="brcd_dist.data.reading"):
        lens, batches, stats = epoch_on_ranks(m, "train", 2)
    assert [len(b) for b in batches] == lens and lens[0] == lens[1]
    assert set(keys_of(batches[0]) + keys_of(batches[1])) == intact
    # a rank that ran short fills its last steps re-using samples (counted): only those steps repeat keys
    assert sum(s.padded_steps for s in stats) >= 1
    fresh = [k for bs, s in zip(batches, stats) for k in keys_of(bs[: len(bs) - s.padded_steps])]
    assert len(fresh) == len(set(fresh))
    assert sum(s.skipped for s in stats) == m.splits["train"].count - len(intact)
    assert sum(s.bad_samples for s in stats) >= 1 and sum(s.missing_samples for s in stats) >= 1
    assert any("skipped" in r.getMessage() for r in caplog.records)


def test_damaged_eval_data_is_skipped_and_the_rest_read_once(damaged):
    m, intact = damaged
    per_rank = eval_on_ranks(m, "train", 2)
    every = keys_of(per_rank[0]) + keys_of(per_rank[1])
    assert len(every) == len(set(every)) and set(every) == intact


# ----------------------------------------------------------------------------- augmentations


def _rgb(n=3, seed=0):
    return torch.rand(n, 3, 12, 10, generator=torch.Generator().manual_seed(seed))


def _photo(w=40, h=30, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_a_view_without_crop_jitter_or_flip_is_a_plain_resize_and_flip_mirrors_it():
    im = _photo()
    whole = augment.ViewParams(box=(0.0, 0.0, 40.0, 30.0), flip=False)
    plain = np.asarray(TF.resize(im, [24, 24]))
    assert np.array_equal(augment.augment_view(im, whole, 24), plain)
    mirrored = augment.ViewParams(box=(0.0, 0.0, 40.0, 30.0), flip=True)
    assert np.array_equal(augment.augment_view(im, mirrored, 24), plain[:, ::-1])


def test_view_colour_ops_are_torchvisions_in_fixed_order():
    im = _photo(seed=1)
    p = augment.ViewParams(
        box=(4.0, 2.0, 36.0, 26.0), flip=False, brightness=1.2, contrast=0.7, saturation=1.3, hue=-0.05
    )
    crop = augment.crop_resize(im, p.box, 16, flip=False)
    # PIL's box resize filters across the box edge; crop-then-resize (torchvision) differs only there
    tv_crop = np.asarray(TF.resized_crop(im, 2, 4, 24, 32, [16, 16]), dtype=float)  # top, left, height, width
    assert np.abs(np.asarray(crop, dtype=float) - tv_crop)[2:-2, 2:-2].max() <= 1
    ref = crop
    for op, f in (
        (TF.adjust_brightness, 1.2),
        (TF.adjust_contrast, 0.7),
        (TF.adjust_saturation, 1.3),
        (TF.adjust_hue, -0.05),
    ):
        ref = op(ref, f)
    assert np.array_equal(augment.augment_view(im, p, 16), np.asarray(ref))
    gray = augment.augment_view(im, augment.ViewParams(box=p.box, flip=False, gray=True), 16)
    assert gray.shape == (16, 16, 3) and np.array_equal(gray[..., 0], gray[..., 2])


def test_blur_equals_torchvision_with_per_image_sigma():
    x, sigmas = _rgb(2, seed=2), torch.tensor([0.3, 1.7])
    ours = augment.gaussian_blur3(x, sigmas)
    for img, s, o in zip(x, sigmas, ours):
        assert torch.allclose(o, TF.gaussian_blur(img, [3, 3], [float(s), float(s)]), atol=1e-6)


def test_crop_draws_respect_scale_ratio_and_image_bounds():
    spec = augment.paper_augment_spec(224, 3)
    rng = np.random.default_rng(0)
    for i in range(300):
        w = int(rng.integers(30, 300))
        h = round(w * rng.uniform(0.8, 1.25))
        p = augment.draw_view(augment.view_rng(0, 0, f"k{i}"), w, h, spec)
        left, top, right, bottom = p.box
        assert 0 <= left < right <= w and 0 <= top < bottom <= h
        cw, ch = right - left, bottom - top
        assert 0.5 - 0.08 <= cw * ch / (w * h) <= 1.0  # tolerances: rounding to whole pixels
        assert 0.75 - 0.08 <= cw / ch <= 4 / 3 + 0.08


def test_recipe_is_scaled_to_channels_and_size():
    gray, rgb_small, rgb_big = (
        augment.paper_augment_spec(32, 1),
        augment.paper_augment_spec(32, 3),
        augment.paper_augment_spec(224, 3),
    )
    assert (gray.saturation, gray.hue, gray.gray_p, gray.brightness, gray.contrast) == (0, 0, 0, 0.4, 0.4)
    assert (rgb_small.blur_p, rgb_big.blur_p, rgb_big.hue, rgb_big.gray_p) == (0, 0.5, 0.1, 0.2)
