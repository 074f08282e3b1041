"""The paper's augmentations (augment.py) as batched tensor ops on uint8 images, on any device.

The same views as augment.TwoViews: the random parameters are drawn by the same code (augment.draw_view) from the
same source (augment.view_rng(seed, epoch, key)), so a CPU run and a GPU run see the same crops, flips, jitters
and blurs; only the arithmetic differs. Each op follows what the PIL path computes, including its rounding:
- crop + resize: antialiased bilinear (torch's antialias follows PIL's filter support), rounded to uint8 levels;
- brightness, contrast, saturation: PIL's ImageEnhance blends with a black / mean-grey / greyscale image, and
  PIL truncates a blend's result to uint8 (floor here); the grey is PIL's rounded ITU-R 601 luma;
- hue: rotation in HSV (torchvision's tensor formulas, float; PIL's HSV holds 8-bit hue, the one inexact step);
- grayscale: PIL's rounded luma; blur (3x3, per-image sigma) and normalisation: augment's own tensor ops.
tests/test_tensor_augment.py pins the distance to the PIL path on real photos.

Input: a list of (C, H, W) uint8 tensors (C = in_chans; sizes may differ), all on one device. Output: (N, C, S, S)
float32, normalised, on that device. Crops are per image (sizes differ), the colour ops are batched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from brcd_dist.data.augment import (
    GRAY_MEAN,
    GRAY_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentSpec,
    ViewParams,
    centre_square,
    draw_view,
    gaussian_blur3,
    paper_augment_spec,
    view_rng,
)

LUMA = (0.299, 0.587, 0.114)  # PIL's convert("L"): (R*19595 + G*38470 + B*7471 + 2**15) >> 16


def crop_resize(
    images: list[torch.Tensor],
    boxes: list[tuple[float, float, float, float]],
    size: int,
    flips: list[bool] | None = None,
    *,
    fixed_point: bool | None = None,
) -> torch.Tensor:
    """Each image's box (left, top, right, bottom; integer pixels) resized to (size, size), antialiased bilinear,
    rounded to uint8 levels, mirrored where flips says: (N, C, size, size) float32 in [0, 255].
    fixed_point (None: on a CPU): torch's uint8 kernel, else float32 then rounded (what a GPU runs)."""
    out = []
    for i, (image, box) in enumerate(zip(images, boxes)):
        left, top, right, bottom = (round(v) for v in box)
        crop = image[:, top:bottom, left:right].unsqueeze(0)
        if fixed_point if fixed_point is not None else crop.device.type == "cpu":  # 4x the float kernel on CPU
            crop = crop.contiguous(memory_format=torch.channels_last)
        else:
            crop = crop.float()
        view = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        if flips is not None and flips[i]:
            view = view.flip(-1)
        out.append(view)
    x = torch.cat(out).contiguous()
    return x.float() if x.dtype == torch.uint8 else x.round_().clamp_(0, 255)


def luma(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) levels -> (N, 1, H, W) PIL's rounded greyscale; one channel is its own grey."""
    if x.shape[1] == 1:
        return x
    w = torch.tensor(LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True).round_()


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's Image.blend(degenerate, x, factor) on uint8 levels, degenerate + factor (x - degenerate): clipped,
    then truncated. In place on x."""
    return x.sub_(degenerate).mul_(factor.view(-1, 1, 1, 1)).add_(degenerate).clamp_(0, 255).floor_()


def adjust_brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return x.mul_(f.view(-1, 1, 1, 1)).clamp_(0, 255).floor_()  # a blend with black


def adjust_contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    mean = torch.floor(luma(x).mean(dim=(1, 2, 3), keepdim=True) + 0.5)  # PIL: int(mean + 0.5)
    return _blend(mean, x, f)


def adjust_saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(luma(x), x, f)


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    div = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / div, (maxc - g) / div, (maxc - b) / div
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return torch.stack((h, s, maxc), 1)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """The closed form of the sector table: channel n (R, G, B = 5, 3, 1) is v - v s clamp(min(k, 4 - k), 0, 1)
    with k = (n + 6h) mod 6."""
    h, s, v = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = torch.remainder(n + 6.0 * h, 6.0)
    return v - v * s * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)


def adjust_hue(x: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    hsv = _rgb_to_hsv(x / 255.0)
    hsv[:, 0] = torch.remainder(hsv[:, 0] + hue.view(-1, 1, 1), 1.0)
    return (_hsv_to_rgb(hsv) * 255.0).round_()


def to_grayscale(x: torch.Tensor) -> torch.Tensor:
    return luma(x).expand_as(x).contiguous()


def _apply(x: torch.Tensor, values: list[float], neutral: float, op) -> torch.Tensor:
    """x[i] = op(x[i], values[i]) for the images whose value is not the neutral one, in one batched call."""
    idx = [i for i, v in enumerate(values) if v != neutral]
    if idx:
        sel = torch.tensor(idx, device=x.device)
        x[sel] = op(x[sel], torch.tensor([values[i] for i in idx], device=x.device, dtype=x.dtype))
    return x


def _factors(x: torch.Tensor, values: list[float]) -> torch.Tensor:
    return torch.tensor(values, device=x.device, dtype=x.dtype)


def normalise(x: torch.Tensor, in_chans: int) -> torch.Tensor:
    """augment.normalise on x's device."""
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if in_chans == 3 else (GRAY_MEAN, GRAY_STD)
    mean_t = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    return (x - mean_t) / torch.tensor(std, device=x.device).view(1, -1, 1, 1)


def augment_batch(images: list[torch.Tensor], params: list[ViewParams], spec: AugmentSpec) -> torch.Tensor:
    """One view of each image with its drawn parameters: crop, flip, jitter (brightness, contrast, saturation,
    hue, in that fixed order, as augment.augment_view), grayscale, blur; normalised (N, C, S, S) float32."""
    x = crop_resize(images, [p.box for p in params], spec.image_size, [p.flip for p in params])
    # the blends are exact identities at factor 1 on integer levels: one batched call over all images
    x = adjust_brightness(x, _factors(x, [p.brightness for p in params]))
    x = adjust_contrast(x, _factors(x, [p.contrast for p in params]))
    if x.shape[1] == 3:
        x = adjust_saturation(x, _factors(x, [p.saturation for p in params]))
        x = _apply(x, [p.hue for p in params], 0.0, adjust_hue)
        x = _apply(x, [float(p.gray) for p in params], 0.0, lambda y, _: to_grayscale(y))
    x = x.div_(255.0)
    sigmas = [p.sigma for p in params]
    if any(s > 0 for s in sigmas):
        idx = torch.tensor([i for i, s in enumerate(sigmas) if s > 0], device=x.device)
        x[idx] = gaussian_blur3(x[idx], torch.tensor([s for s in sigmas if s > 0], device=x.device))
    return normalise(x, spec.in_chans)


class TensorTwoViews:
    """augment.TwoViews on uint8 tensors: two views of each image, reproducible from (seed, epoch, key)."""

    def __init__(self, image_size: int, in_chans: int, seed: int, epoch: int):
        self.spec = paper_augment_spec(image_size, in_chans)
        self.seed, self.epoch = seed, epoch

    def params(self, sizes: list[tuple[int, int]], keys: list[str]) -> tuple[list[ViewParams], list[ViewParams]]:
        """Both views' parameters for images of (height, width) `sizes`: the draws of augment.TwoViews."""
        views: tuple[list, list] = ([], [])
        for (h, w), key in zip(sizes, keys):
            rng = view_rng(self.seed, self.epoch, key)
            for v in (0, 1):
                views[v].append(draw_view(rng, w, h, self.spec))
        return views

    def __call__(self, images: list[torch.Tensor], keys: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        p1, p2 = self.params([tuple(im.shape[-2:]) for im in images], keys)
        return augment_batch(images, p1, self.spec), augment_batch(images, p2, self.spec)


def eval_batch(images: list[torch.Tensor], image_size: int, in_chans: int) -> torch.Tensor:
    """augment.eval_batch on uint8 tensors: the centre square resized to image_size, normalised."""
    boxes = [centre_square(im.shape[-1], im.shape[-2]) for im in images]
    return normalise(crop_resize(images, boxes, image_size).div_(255.0), in_chans)
