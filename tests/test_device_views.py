"""The device path of the reader (loader workers ship uint8, the batch is decoded and augmented where the model
runs; decoding.py) run on the CPU: it must give the loader-worker path's batches exactly, since both decode with
libjpeg-turbo and run the same tensor_augment code on the same (seed, epoch, key) draws. On a GPU only the device
changes (nvJPEG's decoder, CUDA kernels); bench/dataloader.py measures that path where a GPU is lent."""

import numpy as np
import pytest
import torch
from PIL import Image

from brcd_dist.data import eval_batches, train_batches, write_shards
from brcd_dist.data.decoding import decode_batch, loader_payload


@pytest.fixture(scope="module")
def jpeg_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / f"c{c}").mkdir()
        for i in range(12):
            arr = rng.integers(0, 256, (int(rng.integers(40, 60)), int(rng.integers(40, 60)), 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / f"c{c}" / f"{i:02d}.jpg", quality=90)
    return write_shards(
        tmp_path_factory.mktemp("shards"),
        "imagefolder",
        str(root),
        train_per_class=6,
        samples_per_shard=10,
        in_chans=3,
        shorter_side=0,
        progress=False,
    )


LOADER = dict(rank=0, world_size=1, num_workers=1, image_size=32, in_chans=3)


def test_device_path_on_cpu_gives_the_loader_paths_train_views(jpeg_shards):
    kw = dict(batch_size=8, epoch=1, seed=3, **LOADER)
    loader = list(train_batches(jpeg_shards, "database", **kw))
    device = list(train_batches(jpeg_shards, "database", device="cpu", augment_on_device=True, **kw))
    assert [b["key"] for b in loader] == [b["key"] for b in device]
    for a, b in zip(loader, device):
        assert torch.equal(a["view1"], b["view1"]) and torch.equal(a["view2"], b["view2"])
        assert torch.equal(a["label"], b["label"]) and "images" not in b


def test_device_path_on_cpu_gives_the_loader_paths_eval_images(jpeg_shards):
    loader = list(eval_batches(jpeg_shards, "val_query", batch_size=4, **LOADER))
    device = list(eval_batches(jpeg_shards, "val_query", batch_size=4, augment_on_device=True, **LOADER))
    assert sum(len(b["key"]) for b in device) == jpeg_shards.splits["val_query"].count
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(loader, device))


def test_a_damaged_jpeg_in_a_device_batch_drops_only_itself(tmp_path):
    good = tmp_path / "a.jpg"
    Image.fromarray(np.zeros((8, 10, 3), dtype=np.uint8)).save(good)
    payloads = [
        loader_payload(good.read_bytes(), "jpg", 3, decode_later=True),
        loader_payload(good.read_bytes()[:40], "jpg", 3, decode_later=True),
    ]
    images, bad = decode_batch(payloads, 3, "cpu")
    assert bad == [1] and [tuple(im.shape) for im in images] == [(3, 8, 10)]
