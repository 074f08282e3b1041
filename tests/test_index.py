"""The searchable index (brcd_dist/index.py): FAISS binary indexes over packed codes, saved and loaded whole,
queried by images through the model that made the codes. Real FAISS, real (tiny, random-init) timm models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from brcd_dist.codes import pack_codes
from brcd_dist.index import (
    AUTO_EXACT_MAX,
    FILES,
    Index,
    build_faiss,
    choose_kind,
    encode_queries,
    recall_at_k,
    search_faiss,
)
from brcd_dist.models import HashModel

BITS = 64


def clustered_codes(n: int, centres: int = 200, flip: float = 0.12, seed: int = 0) -> np.ndarray:
    """Packed 64-bit codes around random centres, each bit flipped with probability `flip`: the neighbourhood
    structure real hash codes have (uniform random codes have no near neighbours to find)."""
    rng = np.random.default_rng(seed)
    c = rng.integers(0, 2, (centres, BITS), dtype=np.uint8)
    bits = c[rng.integers(0, centres, n)] ^ (rng.random((n, BITS)) < flip).astype(np.uint8)
    return np.packbits(bits, axis=1)


def hamming_reference(q: np.ndarray, db: np.ndarray) -> np.ndarray:
    return np.unpackbits(q[:, None, :] ^ db[None, :, :], axis=2).sum(axis=2)


def centre_head(model: HashModel, images: torch.Tensor) -> HashModel:
    """A random-init model's codes nearly all agree (its features share a large mean); centring the hash head's
    bias on the features of `images` makes the codes random projections of centred features: spread out, as a
    trained model's are. Tests that need distinct codes for distinct images use it."""
    with torch.no_grad():
        features = model.eval().backbone(images)
        model.head.bias -= model.head(features).mean(0)
    return model


@pytest.fixture(scope="module")
def model() -> HashModel:
    torch.manual_seed(0)
    return centre_head(HashModel("resnet10t", BITS, in_chans=1, img_size=32), torch.randn(64, 1, 32, 32))


def test_exact_index_returns_the_reference_hamming_distances_in_order():
    db, q = clustered_codes(2000), clustered_codes(20, seed=1)
    dist, ids = search_faiss(build_faiss(db, "flat"), q, 10)
    ref = hamming_reference(q, db)
    assert np.array_equal(dist, np.sort(ref, axis=1)[:, :10])
    assert np.array_equal(np.take_along_axis(ref, ids, axis=1), dist)


@pytest.mark.parametrize("kind,floor", [("ivf", 0.9), ("hnsw", 0.9)])
def test_approximate_index_recall_at_10_against_exact_on_clustered_codes(kind, floor):
    db, q = clustered_codes(20_000), clustered_codes(200, seed=1)
    exact, _ = search_faiss(build_faiss(db, "flat"), q, 10)
    approx, _ = search_faiss(build_faiss(db, kind), q, 10)
    recall = recall_at_k(approx, exact)
    print(f"{kind}: recall@10 {recall:.3f}")
    assert recall >= floor


def test_recall_counts_hits_as_near_as_the_exact_kth_neighbour():
    exact = np.array([[0, 1, 2], [3, 3, 3]])
    approx = np.array([[0, 2, 5], [3, 3, 4]])  # a tie at the k-th distance counts; farther ones miss
    assert recall_at_k(approx, exact) == pytest.approx(4 / 6)


def test_auto_kind_is_exact_up_to_the_threshold_and_ivf_above():
    assert choose_kind("auto", AUTO_EXACT_MAX) == "flat"
    assert choose_kind("auto", AUTO_EXACT_MAX + 1) == "ivf"
    assert choose_kind("hnsw", 10) == "hnsw"


def test_unknown_kind_is_refused_naming_the_allowed_ones():
    with pytest.raises(ValueError, match=r"'lsh'.*auto, flat, ivf, hnsw"):
        choose_kind("lsh", 10)


def test_saved_index_loads_back_and_answers_the_same(model, tmp_path):
    images = torch.randn(40, 1, 32, 32)
    codes = encode_queries(model, images)
    keys = [f"k{i:03d}" for i in range(40)]
    index = Index.build(codes, keys, np.arange(40) % 4, model, kind="flat", source={"model_uri": "x", "version": "3"})
    index.save(tmp_path / "idx")
    loaded = Index.load(tmp_path / "idx")
    assert loaded.meta["version"] == "3" and loaded.kind == "flat" and len(loaded) == 40
    assert np.array_equal(loaded.codes, codes) and list(loaded.keys) == keys
    assert loaded.search(images[:5], 7) == index.search(images[:5], 7)


def test_a_database_image_finds_itself_at_distance_zero(model):
    images = torch.randn(40, 1, 32, 32)
    codes = encode_queries(model, images)
    assert len(np.unique(codes, axis=0)) == 40  # the premise: no other image shares its code
    index = Index.build(codes, [f"k{i}" for i in range(40)], np.zeros(40), model, kind="flat")
    for i in (0, 17, 39):
        hits = index.search(images[i : i + 1], 5)[0]
        assert hits[0].distance == 0 and f"k{i}" in {h.key for h in hits if h.distance == 0}


def test_image_files_are_encoded_like_the_evaluation_transform_of_the_same_images(model, tmp_path):
    from PIL import Image

    from brcd_dist.data.augment import eval_batch

    rng = np.random.default_rng(0)
    pil = [Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), "L") for _ in range(3)]
    paths = []
    for i, im in enumerate(pil):
        paths.append(tmp_path / f"{i}.png")
        im.save(paths[-1])
    expected = pack_codes(model.encode(eval_batch(pil, 32, 1)))
    assert np.array_equal(encode_queries(model, [str(p) for p in paths]), expected)


def test_codes_that_do_not_fit_the_model_are_refused(model):
    with pytest.raises(ValueError, match="64 bits"):
        Index.build(np.zeros((3, 4), np.uint8), ["a", "b", "c"], [0, 0, 0], model)


def test_duplicate_keys_are_refused(model):
    with pytest.raises(ValueError, match="not unique"):
        Index.build(np.zeros((2, 8), np.uint8), ["a", "a"], [0, 0], model)


def _job(name: str):
    import importlib.util
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "jobs"))
    spec = importlib.util.spec_from_file_location(f"job_{name}", REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_index_job_refuses_images_that_are_neither_shards_nor_a_folder_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        _job("index").main(
            ["models:/brcd-student@champion", "--images", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]
        )
    assert exit_.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: --images") and "nowhere" in line
    assert not (tmp_path / "out").exists()


def test_search_job_refuses_a_missing_query_file_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        _job("search").main([str(tmp_path), "--query", str(tmp_path / "missing.png")])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f"error: --query: no such file: {tmp_path / 'missing.png'}"]


def test_an_index_on_the_bucket_loads_back_and_jobs_search_answers_from_it(model, object_store, tmp_path, capsys):
    """Index.save / Index.load and jobs/search.py on an s3:// prefix of the loopback store, as on a local dir."""
    import uuid

    from PIL import Image

    from brcd_dist import storage

    rng = np.random.default_rng(1)
    pil = [Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), "L") for _ in range(20)]
    for i, im in enumerate(pil):
        im.save(tmp_path / f"{i}.png")
    paths = [str(tmp_path / f"{i}.png") for i in range(20)]
    codes = encode_queries(model, paths)
    index = Index.build(codes, [f"k{i:02d}" for i in range(20)], np.arange(20) % 2, model, kind="flat")
    url = object_store.url("indexes", uuid.uuid4().hex[:8])
    index.save(url)
    assert sorted(storage.listdir(url)) == sorted(FILES.values())
    loaded = Index.load(url)
    assert np.array_equal(loaded.codes, codes) and loaded.search(paths[:3], 4) == index.search(paths[:3], 4)
    capsys.readouterr()
    _job("search").main([url, "--query", paths[7], "--k", "3"])
    hits = [line.split("\t") for line in capsys.readouterr().out.splitlines()[1:]]
    assert hits[0][3] == "0" and ["k07", "0"] in [h[2:4] for h in hits]
    with pytest.raises(FileNotFoundError, match="meta.json: not found"):
        Index.load(url + "-missing")
