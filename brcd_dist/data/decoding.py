"""Shard images to uint8 tensors, in a loader worker (CPU) or in batches on the training device (nvJPEG).

Where a batch is decoded and augmented (DESIGN §5, "the data path feeds a GPU"):
- in the loader workers (CPU training): each sample is decoded to a (C, H, W) uint8 tensor and the chunk is
  augmented there with tensor_augment (the workers ship float views);
- on the device (GPU training): the workers ship a JPEG's encoded bytes as a 1-D uint8 tensor (other formats
  decoded, (C, H, W) uint8), pinned by the DataLoader; the main process decodes the whole batch at once with
  torchvision.io.decode_jpeg(device=...) and augments it there with the same tensor_augment code.
Both ways draw each view's parameters from (seed, epoch, key), so the two see the same views.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from brcd_dist.data import tensor_augment

JPEG_EXTS = ("jpg", "jpeg")
# torchvision 0.29 warns on every decode that TorchCodec will take image decoding over; torchcodec is not a
# dependency yet (its nvJPEG batch decoder is the successor to move to), so the warning is silenced here.
warnings.filterwarnings(
    "ignore", message="The image decoding and encoding capabilities of TorchVision", category=DeprecationWarning
)


def _mode(in_chans: int) -> ImageReadMode:
    return ImageReadMode.GRAY if in_chans == 1 else ImageReadMode.RGB


def decode_uint8(data: bytes, in_chans: int) -> torch.Tensor:
    """Encoded JPEG, PNG or WebP -> (in_chans, H, W) uint8 on the CPU; PIL for what torchvision does not read."""
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    try:
        return decode_image(buf, mode=_mode(in_chans))
    except RuntimeError:
        with Image.open(io.BytesIO(data)) as im:
            arr = np.asarray(im.convert("L" if in_chans == 1 else "RGB"))
        t = torch.from_numpy(arr.copy())
        return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


def loader_payload(data: bytes, ext: str, in_chans: int, *, decode_later: bool) -> torch.Tensor:
    """What a loader worker ships for one image: a JPEG's bytes (1-D uint8) when the device decodes it later,
    else the decoded (C, H, W) uint8 image."""
    if decode_later and ext in JPEG_EXTS:
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return decode_uint8(data, in_chans)


def decode_batch(
    payloads: list[torch.Tensor], in_chans: int, device: torch.device | str
) -> tuple[list[torch.Tensor], list[int]]:
    """Loader payloads -> ((C, H, W) uint8 images on `device`, indices of the payloads that did not decode).
    JPEG bytes are decoded together in one call (nvJPEG's batched decoder on CUDA); a batch that fails is
    decoded one by one, so one damaged image costs only itself."""
    device = torch.device(device)
    out: list[torch.Tensor | None] = [None] * len(payloads)
    encoded = [i for i, p in enumerate(payloads) if p.ndim == 1]
    for i, p in enumerate(payloads):
        if p.ndim == 3:
            out[i] = p.to(device, non_blocking=True)
    bad: list[int] = []
    if encoded:
        try:
            images = decode_jpeg([payloads[i] for i in encoded], mode=_mode(in_chans), device=device)
            for i, im in zip(encoded, images):
                out[i] = im
        except RuntimeError:
            for i in encoded:
                try:
                    out[i] = decode_jpeg(payloads[i], mode=_mode(in_chans), device=device)
                except RuntimeError:
                    bad.append(i)
    return [im for im in out if im is not None], bad


def views_on_device(
    batch: dict[str, Any],
    *,
    train: bool,
    image_size: int,
    in_chans: int,
    seed: int,
    epoch: int,
    device: torch.device | str,
) -> tuple[dict[str, Any], list[str]]:
    """A batch whose "images" are loader payloads -> the batch with "view1"/"view2" (train) or "image" on
    `device`, and the keys of the images that did not decode (dropped from the batch)."""
    images, bad = decode_batch(batch.pop("images"), in_chans, device)
    dropped = [batch["key"][i] for i in bad]
    if bad:
        keep = [i for i in range(len(batch["key"])) if i not in set(bad)]
        batch["key"] = [batch["key"][i] for i in keep]
        batch["label"] = batch["label"][keep]
    if train:
        batch["view1"], batch["view2"] = tensor_augment.TensorTwoViews(image_size, in_chans, seed, epoch)(
            images, batch["key"]
        )
    else:
        batch["image"] = tensor_augment.eval_batch(images, image_size, in_chans)
    return batch, dropped  # labels stay on the CPU, as in the loader-worker path
