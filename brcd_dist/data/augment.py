"""Image transforms: two augmented views for training, a deterministic one for evaluation.

The recipe is CIBHash/BRCD's (authors' code, `utils/data.py`): random resized crop, scale (0.5, 1); horizontal
flip; colour jitter (brightness 0.4, contrast 0.4, saturation 0.4, hue 0.1) with p = 0.7; grayscale p = 0.2;
Gaussian blur, kernel 3, sigma in [0.1, 2], p = 0.5; ImageNet normalisation. Scaled to the image:
- one channel: brightness and contrast only, no grayscale (no colour to jitter or remove), mean/std 0.5;
- blur only from 64 px up (a 3x3 kernel is a light blur at 224 px, at 32 px it wipes out most detail).

How: one image at a time with PIL (crop + resize in one `resize(box=...)` call, then torchvision's functional
colour ops on the PIL image, as ColorJitter does on PIL input), then blur and normalisation on the whole chunk
as tensor ops with a per-image sigma. Skipping the transform classes' per-call overhead: 55 us a view at 32 px
(torchvision's composed v2 transforms: about 250 us); at 224 px RGB about 4.8 ms a view (v2: about 5.5 ms).
Unlike ColorJitter, the jitter order is fixed (brightness, contrast, saturation, hue). Random draws come from
random.Random(seed, epoch, key): a sample's views do not depend on the rank or loader worker that read it, and
torch's global RNG is untouched.
"""

from __future__ import annotations

import math
import random
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.v2 import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_MEAN, GRAY_STD = (0.5,), (0.5,)
BLUR_MIN_SIZE = 64


@dataclass(frozen=True)
class AugmentSpec:
    image_size: int
    in_chans: int
    crop_scale: tuple[float, float] = (0.5, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.7
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    gray_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)


def paper_augment_spec(image_size: int, in_chans: int) -> AugmentSpec:
    """The CIBHash/BRCD recipe scaled to the image size and channel count (module docstring)."""
    colour = {} if in_chans == 3 else dict(saturation=0.0, hue=0.0, gray_p=0.0)
    blur = {} if image_size >= BLUR_MIN_SIZE else dict(blur_p=0.0)
    return AugmentSpec(image_size, in_chans, **colour, **blur)


@dataclass(frozen=True)
class ViewParams:
    box: tuple[float, float, float, float]  # crop (left, top, right, bottom) in source pixels
    flip: bool
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0
    hue: float = 0.0
    gray: bool = False
    sigma: float = 0.0  # 0: no blur


def draw_view(rng: random.Random, width: int, height: int, spec: AugmentSpec) -> ViewParams:
    """One view's random parameters. The crop follows torchvision's RandomResizedCrop.get_params."""
    area = width * height
    box = None
    for _ in range(10):
        target = area * rng.uniform(*spec.crop_scale)
        aspect = math.exp(rng.uniform(math.log(spec.crop_ratio[0]), math.log(spec.crop_ratio[1])))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top, left = rng.randint(0, height - h), rng.randint(0, width - w)
            box = (left, top, left + w, top + h)
            break
    if box is None:  # fallback: the centre crop of the nearest allowed ratio
        ratio = width / height
        if ratio < spec.crop_ratio[0]:
            w, h = width, round(width / spec.crop_ratio[0])
        elif ratio > spec.crop_ratio[1]:
            w, h = round(height * spec.crop_ratio[1]), height
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
        box = (left, top, left + w, top + h)
    flip = rng.random() < spec.flip_p
    jitter = {}
    if rng.random() < spec.jitter_p:
        for name in ("brightness", "contrast", "saturation"):
            amount = getattr(spec, name)
            jitter[name] = rng.uniform(max(0.0, 1 - amount), 1 + amount) if amount else 1.0
        jitter["hue"] = rng.uniform(-spec.hue, spec.hue) if spec.hue else 0.0
    gray = rng.random() < spec.gray_p
    sigma = rng.uniform(*spec.blur_sigma) if rng.random() < spec.blur_p else 0.0
    return ViewParams(tuple(float(v) for v in box), flip, gray=gray, sigma=sigma, **jitter)


def crop_resize(image: Image.Image, box: tuple[float, float, float, float], size: int, flip: bool) -> Image.Image:
    """The box resized bilinearly to (size, size) (antialiased when shrinking), then mirrored if flip."""
    out = image.resize((size, size), Image.BILINEAR, box=box)
    return out.transpose(Image.FLIP_LEFT_RIGHT) if flip else out


def augment_view(image: Image.Image, p: ViewParams, size: int) -> np.ndarray:
    """Crop, flip, jitter and grayscale one view (blur comes later, batched): (size, size[, 3]) uint8."""
    view = crop_resize(image, p.box, size, p.flip)
    if p.brightness != 1.0:
        view = TF.adjust_brightness(view, p.brightness)
    if p.contrast != 1.0:
        view = TF.adjust_contrast(view, p.contrast)
    if p.saturation != 1.0:
        view = TF.adjust_saturation(view, p.saturation)
    if p.hue != 0.0:
        view = TF.adjust_hue(view, p.hue)
    if p.gray and view.mode == "RGB":
        view = TF.rgb_to_grayscale(view, num_output_channels=3)
    return np.asarray(view)


def to_float_batch(arrays: list[np.ndarray]) -> torch.Tensor:
    """list of (H, W) or (H, W, C) uint8 -> (N, C, H, W) float32 in [0, 1]."""
    x = torch.from_numpy(np.stack(arrays))
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    return x.float().div_(255.0)


# ----------------------------------------------------------------------------- ops


def gaussian_blur3(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """3x3 Gaussian blur with a per-image sigma (N,), reflect padding, as torchvision's gaussian_blur."""
    n, c, h, w = x.shape
    taps = torch.tensor([-1.0, 0.0, 1.0], device=x.device)
    k = torch.exp(-0.5 * (taps / sigma.view(-1, 1)) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (N*C, 3)
    y = F.pad(x.reshape(1, n * c, h, w), (1, 1, 1, 1), mode="reflect")
    y = F.conv2d(y, k.view(n * c, 1, 1, 3), groups=n * c)
    y = F.conv2d(y, k.view(n * c, 1, 3, 1), groups=n * c)
    return y.view(n, c, h, w)


def blur_some(x: torch.Tensor, sigmas: list[float]) -> torch.Tensor:
    """Blur the images whose sigma is > 0 (in place), each with its own sigma."""
    sel = torch.tensor([s > 0 for s in sigmas])
    if sel.any():
        x[sel] = gaussian_blur3(x[sel], torch.tensor([s for s in sigmas if s > 0]))
    return x


def normalise(x: torch.Tensor, in_chans: int) -> torch.Tensor:
    """ImageNet statistics for RGB (what pretrained timm weights expect), 0.5/0.5 for one channel."""
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if in_chans == 3 else (GRAY_MEAN, GRAY_STD)
    return (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


# ----------------------------------------------------------------------------- the two transforms


def view_rng(seed: int, epoch: int, key: str) -> random.Random:
    """The random source of one sample's views in one epoch (crc32 is stable across processes; hash() is not)."""
    return random.Random((seed * 1_000_003 + epoch) * 4_294_967_296 + zlib.crc32(key.encode()))


class TwoViews:
    """Two independently augmented views of each image of a chunk, reproducible from (seed, epoch, key)."""

    def __init__(self, image_size: int, in_chans: int, seed: int, epoch: int):
        self.spec = paper_augment_spec(image_size, in_chans)
        self.seed, self.epoch = seed, epoch

    def __call__(self, images: list[Image.Image], keys: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.spec.image_size
        arrays: tuple[list, list] = ([], [])
        sigmas: tuple[list, list] = ([], [])
        for image, key in zip(images, keys):
            rng = view_rng(self.seed, self.epoch, key)
            for v in (0, 1):
                p = draw_view(rng, image.width, image.height, self.spec)
                arrays[v].append(augment_view(image, p, size))
                sigmas[v].append(p.sigma)
        return tuple(normalise(blur_some(to_float_batch(arrays[v]), sigmas[v]), self.spec.in_chans) for v in (0, 1))


def centre_square(width: int, height: int) -> tuple[int, int, int, int]:
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return (left, top, left + side, top + side)


def eval_batch(images: list[Image.Image], image_size: int, in_chans: int) -> torch.Tensor:
    """Deterministic: the centre square resized to image_size (= shorter side to size, centre crop), normalised."""
    arrays = [np.asarray(crop_resize(im, centre_square(im.width, im.height), image_size, False)) for im in images]
    return normalise(to_float_batch(arrays), in_chans)
