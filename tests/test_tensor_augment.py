"""The batched uint8-tensor augmentations (tensor_augment.py) against the PIL path (augment.py), on CPU tensors.

Both paths draw the same parameters from (seed, epoch, key), so they must give the same views up to arithmetic.
Tolerances, in uint8 levels (0-255) of the un-normalised view, measured on crops of scikit-learn's two photos:
- the outer pixel ring is left out: PIL's resize(box=...) lets its filter read source pixels outside the box,
  the tensor path crops first and clamps at the crop's edge (both are valid crops; only the ring differs);
- without hue jitter the interior differs by PIL's fixed-point resampling and float rounding: mean < 0.2,
  max <= 5 (a blurred view spreads a 1-level difference over its 3x3 neighbours, at most a few levels);
- PIL's hue shift goes through 8-bit HSV (hue quantised to 1/256 of a turn), the tensor path rotates exactly:
  a few levels on saturated pixels, so for hue-jittered views mean < 0.7 and under 10% of pixels above 2.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from brcd_dist.data import augment, tensor_augment

SEED, EPOCH = 0, 1


@pytest.fixture(scope="module")
def photos():
    from sklearn.datasets import load_sample_images

    return load_sample_images().images


def crops(photos, n, size, mode):
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        h, w = size
        top, left = int(rng.integers(0, 427 - h)), int(rng.integers(0, 640 - w))
        out.append(Image.fromarray(photos[i % 2][top : top + h, left : left + w]).convert(mode))
    return out


def as_tensor(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im).copy()).reshape(im.height, im.width, -1).permute(2, 0, 1).contiguous()


def levels(x: torch.Tensor, in_chans: int) -> torch.Tensor:
    std = augment.IMAGENET_STD if in_chans == 3 else augment.GRAY_STD
    return x * torch.tensor(std).view(1, -1, 1, 1) * 255


def both_paths(images, size, in_chans):
    keys = [f"k{i}" for i in range(len(images))]
    ref = augment.TwoViews(size, in_chans, SEED, EPOCH)(images, keys)
    views = tensor_augment.TensorTwoViews(size, in_chans, SEED, EPOCH)
    got = views([as_tensor(im) for im in images], keys)
    params = views.params([(im.height, im.width) for im in images], keys)
    return ref, got, params


def interior_diff(ref, got, in_chans):
    return (levels(ref, in_chans) - levels(got, in_chans)).abs()[..., 1:-1, 1:-1]


def test_views_draw_the_parameters_of_the_pil_path():
    views = tensor_augment.TensorTwoViews(64, 3, SEED, EPOCH)
    p1, p2 = views.params([(100, 120)], ["img-7"])
    rng = augment.view_rng(SEED, EPOCH, "img-7")
    spec = augment.paper_augment_spec(64, 3)
    assert (p1[0], p2[0]) == (augment.draw_view(rng, 120, 100, spec), augment.draw_view(rng, 120, 100, spec))


def test_rgb_views_without_hue_jitter_match_pil_within_rounding(photos):
    ref, got, (p1, _) = both_paths(crops(photos, 48, (100, 120), "RGB"), 64, 3)
    no_hue = torch.tensor([p.hue == 0.0 for p in p1])
    assert no_hue.sum() >= 5
    d = interior_diff(ref[0][no_hue], got[0][no_hue], 3)
    assert d.mean() < 0.2 and d.max() <= 5.0


def test_rgb_views_with_hue_jitter_stay_within_pils_8_bit_hue(photos):
    ref, got, (p1, _) = both_paths(crops(photos, 48, (100, 120), "RGB"), 64, 3)
    hue = torch.tensor([p.hue != 0.0 and not p.gray for p in p1])
    d = interior_diff(ref[0][hue], got[0][hue], 3)
    assert d.mean() < 0.7 and (d > 2).float().mean() < 0.10


def test_gray_views_match_pil_within_rounding(photos):
    ref, got, _ = both_paths(crops(photos, 32, (40, 36), "L"), 32, 1)
    for v in (0, 1):
        d = interior_diff(ref[v], got[v], 1)
        assert d.mean() < 0.2 and d.max() <= 3.0


def test_eval_view_matches_pil_within_rounding(photos):
    images = crops(photos, 8, (90, 120), "RGB")
    ref = augment.eval_batch(images, 64, 3)
    got = tensor_augment.eval_batch([as_tensor(im) for im in images], 64, 3)
    d = interior_diff(ref, got, 3)
    assert d.mean() < 0.2 and d.max() <= 2.0


def test_crop_of_the_output_size_is_the_pixels_and_flip_mirrors_them():
    image = torch.arange(2 * 5 * 6, dtype=torch.uint8).view(2, 5, 6)
    out = tensor_augment.crop_resize([image, image], [(1, 1, 4, 4), (1, 1, 4, 4)], 3, [False, True])
    assert torch.equal(out[0], image[:, 1:4, 1:4].float())
    assert torch.equal(out[1], image[:, 1:4, 1:4].flip(-1).float())


def test_the_gpus_float_resize_and_the_cpus_fixed_point_one_differ_by_at_most_one_level(photos):
    """A CUDA device resizes in float32 (torch has no uint8 antialiased kernel there); this runs that arithmetic
    on the CPU: the one place where a GPU run's views may differ from a CPU run's, by rounding."""
    images = [as_tensor(im) for im in crops(photos, 8, (100, 120), "RGB")]
    boxes = [(3, 5, 90, 97)] * 8
    fixed = tensor_augment.crop_resize(images, boxes, 64, fixed_point=True)
    floating = tensor_augment.crop_resize(images, boxes, 64, fixed_point=False)
    assert (fixed - floating).abs().max() <= 1.0


def test_blends_at_factor_one_and_hue_zero_leave_levels_unchanged():
    x = torch.randint(0, 256, (3, 3, 8, 8)).float()
    one = torch.ones(3)
    assert torch.equal(tensor_augment.adjust_brightness(x.clone(), one), x)
    assert torch.equal(tensor_augment.adjust_contrast(x.clone(), one), x)
    assert torch.equal(tensor_augment.adjust_saturation(x.clone(), one), x)
    assert torch.equal(tensor_augment.adjust_hue(x.clone(), torch.zeros(3)), x)


def test_brightness_truncates_as_pils_blend():
    x = torch.tensor([[[[10.0, 200.0]]]])
    assert tensor_augment.adjust_brightness(x, torch.tensor([1.35])).tolist() == [[[[13.0, 255.0]]]]


def test_hue_rotation_by_a_third_of_a_turn_cycles_pure_colours():
    red = torch.tensor([255.0, 0.0, 0.0]).view(1, 3, 1, 1)
    assert tensor_augment.adjust_hue(red, torch.tensor([1 / 3])).flatten().tolist() == [0.0, 255.0, 0.0]
