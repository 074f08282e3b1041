"""Hash models: any timm backbone + a hash head to L bits (DESIGN §2 "Teacher").

The teacher and the student are the same kind of object: `HashModel(x) -> logits (B, L)`, pre-sigmoid.
Codes are `sign(sigmoid(logits) - 1/2)`, the forward of `codes.probs_and_codes`. A checkpoint written by
`save_hash_model` holds the weights and the spec to rebuild the model with no config.
"""

from __future__ import annotations

import io
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from brcd_dist.config import HEADS, MAX_IMAGE_SIZE, Config, ModelConfig

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "brcd-dist/hash-model/v1"
MLP_HIDDEN = 1000  # the paper's head for a frozen pretrained backbone: feat -> 1000 -> 1000 -> L
# Heads that read the backbone's own (ImageNet, 1000-class) classifier logits rather than its pooled features.
CLASSIFIER_HEADS = {"classifier_mlp": 1000}


def backbone_kwargs(arch: str, img_size: int) -> dict:
    """Extra timm kwargs for small images: ViTs get 8x8 = 64 tokens below 224 px (patch_size = img_size // 8)."""
    kwargs: dict = {"img_size": img_size}
    if arch.startswith(("vit_", "deit_", "deit3_")) and img_size < 224:
        kwargs["patch_size"] = max(1, img_size // 8)
    return kwargs


def create_backbone(
    arch: str, in_chans: int, img_size: int, pretrained: bool = False, kwargs: dict | None = None, num_classes: int = 0
) -> tuple[nn.Module, dict]:
    """timm feature extractor (num_classes=0; or with its classifier) -> (module, the extra kwargs it was built with).

    `kwargs=None` chooses them (`backbone_kwargs`); models that take no `img_size` (CNNs) are retried without it.
    """
    if kwargs is not None:
        return timm.create_model(
            arch, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs
        ), kwargs
    kwargs = backbone_kwargs(arch, img_size)
    try:
        return timm.create_model(
            arch, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs
        ), kwargs
    except TypeError as e:
        if "img_size" not in str(e):
            raise
        return timm.create_model(arch, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans), {}


def hash_head(in_features: int, bits: int, head: str, hidden: int = MLP_HIDDEN) -> nn.Module:
    """`hidden`: the mlp head's width (the paper's 1000)."""
    if head == "linear":
        return nn.Linear(in_features, bits)
    if head == "mlp":
        return nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, bits),
        )
    if head == "classifier_mlp":  # the paper's: Linear(1000, 1000)-ReLU-Linear(1000, L) on the classifier's logits
        return nn.Sequential(nn.Linear(in_features, MLP_HIDDEN), nn.ReLU(inplace=True), nn.Linear(MLP_HIDDEN, bits))
    raise ValueError(f"head={head!r}: allowed: {', '.join(HEADS)}")


class HashModel(nn.Module):
    """timm backbone -> hash head -> L logits. `encode` gives ±1 codes.

    With `frozen_backbone`, the backbone has no trainable parameters and stays in eval mode (BN statistics and
    dropout frozen) even under `.train()`: the paper's setting for a pretrained backbone. Head "classifier_mlp"
    keeps the backbone's 1000-class classifier (part of the backbone, so frozen with it) and reads its logits, as
    the paper's student does.
    """

    def __init__(
        self,
        arch: str,
        bits: int,
        in_chans: int = 3,
        img_size: int = 224,
        head: str = "linear",
        frozen_backbone: bool = False,
        pretrained: bool = False,
        weights_path: str = "",
        backbone_kwargs: dict | None = None,
    ):
        super().__init__()
        self.arch, self.bits, self.in_chans, self.img_size = arch, int(bits), int(in_chans), int(img_size)
        self.head_type, self.frozen_backbone = head, bool(frozen_backbone)
        # Local weights replace timm's download; timm's own weights need internet.
        self.backbone, self.backbone_kwargs = create_backbone(
            arch,
            in_chans,
            img_size,
            pretrained=pretrained and not weights_path,
            kwargs=backbone_kwargs,
            num_classes=CLASSIFIER_HEADS.get(head, 0),
        )
        if weights_path:
            load_backbone_weights(self.backbone, weights_path)
        self.feature_dim = self._feature_dim()
        self.head = hash_head(self.feature_dim, self.bits, head)
        if self.frozen_backbone:
            self.backbone.requires_grad_(False)
        self.train()

    def _feature_dim(self) -> int:
        # One dry forward: timm's num_features is not always the pooled width (MobileNetV3: 288 vs 1024).
        was_training = self.backbone.training
        self.backbone.eval()
        with torch.no_grad():
            dim = self.backbone(torch.zeros(1, self.in_chans, self.img_size, self.img_size)).shape[-1]
        self.backbone.train(was_training)
        return int(dim)

    @property
    def spec(self) -> dict:
        """Everything needed to rebuild this model's architecture (weights not included)."""
        return {
            "arch": self.arch,
            "bits": self.bits,
            "in_chans": self.in_chans,
            "img_size": self.img_size,
            "head": self.head_type,
            "frozen_backbone": self.frozen_backbone,
            "backbone_kwargs": dict(self.backbone_kwargs),
        }

    def train(self, mode: bool = True) -> "HashModel":
        super().train(mode)
        if self.frozen_backbone:
            self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """±1 float codes, +1 where sigmoid(logit) >= 1/2 (as `codes.probs_and_codes`); eval mode, no grad."""
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                p = torch.sigmoid(self.forward(x))
                return torch.where(p >= 0.5, 1.0, -1.0).to(p.dtype)
        finally:
            self.train(was_training)


# ----------------------------------------------------------------------------- backbone weights


@dataclass
class WeightsLoadReport:
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the backbone, not in the file: left at their init
    unexpected: list[str] = field(default_factory=list)  # in the file, not in the backbone (e.g. a classifier)
    mismatched: list[str] = field(default_factory=list)  # same name, other shape: skipped


def _state_dict_from_file(path: str | Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(ckpt, dict) and isinstance(ckpt.get(key), dict):
            ckpt = ckpt[key]
            break
    if not isinstance(ckpt, dict):
        raise ValueError(
            f"{path}: expected a state_dict or a dict with 'state_dict'/'model', got {type(ckpt).__name__}"
        )
    if ckpt and all(k.startswith("module.") for k in ckpt):  # saved from DataParallel / DeepSpeed
        ckpt = {k[len("module.") :]: v for k, v in ckpt.items()}
    return ckpt


def _short(names: list[str], n: int = 5) -> str:
    return f"{len(names)}" + (f" {names[:n]}{' ...' if len(names) > n else ''}" if names else "")


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> WeightsLoadReport:
    """Load a local state_dict into a timm backbone, non-strictly, and log what did not fit.

    As timm does for its own weights: the model family's checkpoint filter runs first (ViT: patch and position
    embeddings resampled to this patch size / image size), then the first conv is adapted to `in_chans`
    (3 -> 1 channel sums the RGB filters).
    """
    state = _state_dict_from_file(path)
    filter_fn = getattr(sys.modules.get(type(backbone).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, backbone)
    own = backbone.state_dict()
    first_conv = getattr(backbone, "pretrained_cfg", {}).get("first_conv")
    for conv in [first_conv] if isinstance(first_conv, str) else first_conv or []:
        w, name = state.get(f"{conv}.weight"), f"{conv}.weight"
        if w is not None and name in own and w.ndim == 4 and w.shape[1] != own[name].shape[1]:
            state[name] = timm.models.adapt_input_conv(own[name].shape[1], w, base_chans=w.shape[1])
    report = WeightsLoadReport(mismatched=[k for k, v in state.items() if k in own and v.shape != own[k].shape])
    skipped = set(report.mismatched)
    state = {k: v for k, v in state.items() if k not in skipped}
    result = backbone.load_state_dict(state, strict=False)
    report.missing, report.unexpected = list(result.missing_keys), list(result.unexpected_keys)
    report.loaded = [k for k in state if k in own]
    log.info(
        "backbone weights %s: loaded %d tensors; missing %s; unexpected %s; shape-mismatched (skipped) %s",
        path,
        len(report.loaded),
        _short(report.missing),
        _short(report.unexpected),
        _short(report.mismatched),
    )
    return report


# ----------------------------------------------------------------------------- factories


def build_hash_model(mcfg: ModelConfig, bits: int, in_chans: int, img_size: int) -> HashModel:
    """A fresh hash model from a ModelConfig; `mcfg.uri` naming a local checkpoint file loads that instead.

    models:/ and runs:/ URIs are MLflow's: resolve them with `brcd_dist.tracking` (the cores import no MLflow).
    """
    if mcfg.uri:
        if mcfg.uri.startswith(("models:/", "runs:/")):
            raise ValueError(f"uri={mcfg.uri!r}: an MLflow URI; load it with brcd_dist.tracking, not build_hash_model")
        model = load_hash_model(mcfg.uri)
        want = {"bits": bits, "in_chans": in_chans, "img_size": img_size}
        have = {k: model.spec[k] for k in want}
        if have != want:
            raise ValueError(f"uri={mcfg.uri!r}: checkpoint is {have}, the config asks for {want}")
        return model
    return HashModel(
        mcfg.name,
        bits,
        in_chans,
        img_size,
        head=mcfg.head,
        frozen_backbone=mcfg.frozen_backbone,
        pretrained=mcfg.pretrained,
        weights_path=mcfg.weights_path,
    )


def build_teacher(cfg: Config) -> HashModel:
    return build_hash_model(cfg.teacher, cfg.brcd.bits, cfg.data.in_chans, cfg.data.image_size)


def build_student(cfg: Config) -> HashModel:
    return build_hash_model(cfg.student, cfg.brcd.bits, cfg.data.in_chans, cfg.data.image_size)


# ----------------------------------------------------------------------------- checkpoints


def save_hash_model(model: HashModel, path: str | Path) -> None:
    """One file: {"format", "spec", "state_dict"}; `load_hash_model` rebuilds the model from it alone."""
    from brcd_dist import storage  # a local path or an object store URI (s3://, gs://), written atomically

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with storage.open_write(str(path)) as f:
        torch.save({"format": CHECKPOINT_FORMAT, "spec": model.spec, "state_dict": state}, f)


SPEC_BACKBONE_KWARGS = ("img_size", "patch_size")  # the only timm kwargs a checkpoint may carry (backbone_kwargs)


def check_spec(spec, path: str | Path = "checkpoint") -> dict:
    """A checkpoint's model spec, checked before timm sees any of it (a file from a shared store is input): known
    keys, a timm model name, plain values in range, and no timm kwargs beyond img_size and patch_size."""

    def bad(what: str) -> ValueError:
        return ValueError(f"{path}: model spec {what}; not a checkpoint written by save_hash_model")

    keys = {"arch", "bits", "in_chans", "img_size", "head", "frozen_backbone", "backbone_kwargs"}
    if not isinstance(spec, dict) or set(spec) != keys:
        raise bad(f"keys {sorted(spec) if isinstance(spec, dict) else type(spec).__name__}, expected {sorted(keys)}")
    ints = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    if not isinstance(spec["arch"], str) or not timm.is_model(spec["arch"]):
        raise bad(f"arch={spec['arch']!r} is not a timm model name")
    if not (ints(spec["bits"]) and 8 <= spec["bits"] <= 256 and spec["bits"] % 8 == 0):
        raise bad(f"bits={spec['bits']!r} is not a multiple of 8 in 8..256")
    if spec["in_chans"] not in (1, 3) or not ints(spec["in_chans"]):
        raise bad(f"in_chans={spec['in_chans']!r} is not 1 or 3")
    if not (ints(spec["img_size"]) and 8 <= spec["img_size"] <= MAX_IMAGE_SIZE):
        raise bad(f"img_size={spec['img_size']!r} is not in 8..{MAX_IMAGE_SIZE}")
    if spec["head"] not in HEADS or not isinstance(spec["frozen_backbone"], bool):
        raise bad(f"head={spec['head']!r} / frozen_backbone={spec['frozen_backbone']!r}")
    kw = spec["backbone_kwargs"]
    if (
        not isinstance(kw, dict)
        or not set(kw) <= set(SPEC_BACKBONE_KWARGS)
        or not all(ints(v) and 1 <= v <= MAX_IMAGE_SIZE for v in kw.values())
        or kw.get("img_size", spec["img_size"]) != spec["img_size"]
    ):
        raise bad(f"backbone_kwargs={kw!r} (allowed: {', '.join(SPEC_BACKBONE_KWARGS)} as integers, img_size as above)")
    return spec


def load_hash_model(path: str | Path, map_location: str | torch.device = "cpu") -> HashModel:
    from brcd_dist import storage

    src = path if storage.is_local(str(path)) else io.BytesIO(storage.read_bytes(str(path)))
    ckpt = torch.load(src, map_location=map_location, weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a hash-model checkpoint (written by save_hash_model)")
    s = check_spec(ckpt.get("spec"), path)
    model = HashModel(
        s["arch"],
        s["bits"],
        s["in_chans"],
        s["img_size"],
        head=s["head"],
        frozen_backbone=s["frozen_backbone"],
        backbone_kwargs=s["backbone_kwargs"],
    )
    model.load_state_dict(ckpt["state_dict"])
    return model.to(map_location)


def count_flops(model: nn.Module, in_chans: int, img_size: int) -> int:
    """FLOPs of one image's forward pass (torch.utils.flop_counter: a multiply-add counts 2)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, in_chans, img_size, img_size, device=device))
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())
