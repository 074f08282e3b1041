"""Typed configuration: dataclass defaults <- YAML file <- `key=value` overrides.

Every job resolves its config here, before any Ray worker starts, and every bad
value raises `ConfigError` with one line naming the key, the value and what is
allowed (DESIGN §1; dinov2-style defaults/experiment/CLI merge).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, get_type_hints

import yaml

DATA_SOURCES = ("fashion_mnist", "imagefolder", "shards")
HEADS = ("linear", "mlp", "classifier_mlp")
TEACHER_SPLITS = ("train", "database")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


def __getattr__(name: str) -> Any:
    """KD_METHODS: the names in brcd_dist.losses' registry (read on first use: importing the losses needs torch)."""
    if name == "KD_METHODS":
        from brcd_dist.losses import kd_names
        return kd_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class ConfigError(ValueError):
    """A bad configuration value; the message is one line meant for the user."""


@dataclass
class DataConfig:
    source: str = "fashion_mnist"  # where shards are made from: fashion_mnist | imagefolder | shards (already made)
    source_path: str = "/usr/share/datasets/fashion-mnist"
    shards_dir: str = "data/fashion_mnist"  # local directory holding manifest.json (+ shards unless shards_url)
    shards_url: str = ""  # optional remote base for the shard files: s3://, http(s)://, or pipe:...{shard}
    image_size: int = 32
    in_chans: int = 1
    train_per_class: int = 500
    val_fraction: float = 0.5  # share of the test images used as validation queries (rest: test queries)
    samples_per_shard: int = 1000
    split_seed: int = 0
    loader_workers: int = 1


@dataclass
class ModelConfig:
    name: str = "resnet18"  # any timm model name
    pretrained: bool = False  # timm weights (needs internet) unless weights_path is set
    weights_path: str = ""  # local state_dict for the backbone
    frozen_backbone: bool = False  # frozen pretrained backbone, BN in eval mode (paper setting)
    head: str = "linear"  # linear: feat->L ; mlp: feat->1000->1000->L ; classifier_mlp: logits->1000->L (the paper's)
    uri: str = ""  # an existing hash model: models:/NAME@alias, runs:/..., or a checkpoint file


@dataclass
class BRCDConfig:
    bits: int = 64
    alpha: float = 0.8
    delta: float = 0.5
    clusters: int = 10
    tau: float = 0.3
    lambda_self: float = 1.0
    kd: str = "brcd"  # brcd | none (student alone) | a KD baseline
    kd_weight: float = 1.0
    structural: bool = True  # structural-semantic positive term
    cluster_removal: bool = True  # false-negative removal and offset-positive rule
    bit_mask: bool = True  # per-cluster bit masks
    # BRCD variants (losses/brcd.py; issue 16). The defaults are DESIGN §2.
    mask_normalization: str = "kept"  # a masked similarity over: kept (the kept bits) | length (L)
    mask_sides: str = "anchor"  # mask every code with: anchor (the anchor's cluster mask) | both (its own image's)
    cosine: str = "dot"  # dot (a·b over the normaliser) | normalised (the authors' nn.CosineSimilarity)
    negatives: str = "all"  # all ({s_j, s'_j, t_j, t'_j}) | authors ({s_j, t'_j})
    authors_release: bool = False  # the authors' shipped all-zero masks: an individual-only pull
    recluster_every: int = 0  # re-run k-means every R student epochs (0: once)
    clustering_cache: str = ""  # directory where k-means results are kept by (teacher, data, K, seed) and reused


@dataclass
class KMeansConfig:
    iters: int = 25
    tol: float = 1e-4
    spherical: bool = False
    seed: int = 0


@dataclass
class TrainConfig:
    workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    placement_strategy: str = "PACK"  # Ray placement of the workers: PACK | SPREAD | STRICT_PACK | STRICT_SPREAD
    teacher_epochs: int = 3
    teacher_split: str = "database"  # unlabelled images the teacher learns from: train subset or all database images
    teacher_lr: float = 1e-3
    epochs: int = 10  # student epochs
    batch_size: int = 64  # per-worker micro-batch
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    zero_stage: int = 0
    seed: int = 0
    max_steps_per_epoch: int = 0  # 0: the whole split
    checkpoint_every: int = 200  # steps
    eval_every: int = 1  # epochs; validation mAP for model selection
    early_stop_patience: int = 0  # evaluations without improvement (0: off)
    max_failures: int = 2
    storage_path: str = "runs"
    name: str = ""  # run name under storage_path; "" makes one from the time


@dataclass
class EvalConfig:
    topk: int = 1000
    batch_size: int = 256
    max_queries: int = 0  # 0: all
    max_database: int = 0  # 0: all
    pr_curves: bool = True  # precision-recall curves of the test queries (three full distance matrices)


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str = ""  # "" : sqlite:///<cwd>/mlflow.db
    experiment: str = "brcd-dist"
    register: bool = True
    student_name: str = "brcd-student"
    teacher_name: str = "brcd-teacher"
    alias: str = "candidate"


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    teacher: ModelConfig = field(default_factory=lambda: ModelConfig(name="resnet18"))
    student: ModelConfig = field(default_factory=lambda: ModelConfig(name="mobilenetv3_small_050"))
    brcd: BRCDConfig = field(default_factory=BRCDConfig)
    kmeans: KMeansConfig = field(default_factory=KMeansConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# ----------------------------------------------------------------------------- loading

def _coerce(key: str, raw: Any, typ: type) -> Any:
    """Turn a YAML/CLI value into the field's type, or raise a one-line ConfigError."""
    if typ is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("true", "false", "1", "0", "yes", "no"):
            return raw.lower() in ("true", "1", "yes")
        if isinstance(raw, int) and raw in (0, 1):
            return bool(raw)
        raise ConfigError(f"{key}={raw!r}: expected true or false")
    if typ is int:
        if isinstance(raw, bool):
            raise ConfigError(f"{key}={raw!r}: expected an integer")
        try:
            if isinstance(raw, float) and raw.is_integer():
                return int(raw)
            return int(str(raw))
        except ValueError:
            raise ConfigError(f"{key}={raw!r}: expected an integer") from None
    if typ is float:
        if isinstance(raw, bool):
            raise ConfigError(f"{key}={raw!r}: expected a number")
        try:
            return float(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={raw!r}: expected a number") from None
    if typ is str:
        return "" if raw is None else str(raw)
    raise ConfigError(f"{key}: unsupported type {typ}")


def _apply(obj: Any, data: dict, prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}={data!r}: expected a mapping")
    hints = get_type_hints(type(obj))
    names = {f.name for f in fields(obj)}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise ConfigError(f"unknown key {key!r}; allowed under {prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(names))}")
        cur = getattr(obj, k)
        if is_dataclass(cur):
            _apply(cur, v, key + ".")
        else:
            setattr(obj, k, _coerce(key, v, hints[k]))


def parse_overrides(overrides: list[str]) -> dict:
    """['brcd.alpha=0.7', 'train.workers=2'] -> nested dict (values parsed as YAML scalars)."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. brcd.alpha=0.7")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = tree
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
        node[parts[-1]] = yaml.safe_load(value) if value != "" else ""
    return tree


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                validate: bool = True) -> Config:
    """Defaults, then the YAML file, then overrides; validated unless told otherwise."""
    cfg = Config()
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--config {str(path)!r}: file not found")
        with open(p) as f:
            data = yaml.safe_load(f) or {}
        _apply(cfg, data)
    if overrides:
        _apply(cfg, parse_overrides(overrides))
    if validate:
        validate_config(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict) -> Config:
    cfg = Config()
    _apply(cfg, data)
    return cfg


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flatten(cfg: Config) -> dict[str, Any]:
    """{'brcd.alpha': 0.8, ...}: the form MLflow params and Tune search spaces use."""
    out: dict[str, Any] = {}

    def walk(d: dict, prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v
    walk(to_dict(cfg), "")
    return out


# ----------------------------------------------------------------------------- validation

def _check(cond: bool, key: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"{key}={value!r}: {allowed}")


def _is_timm_model(name: str) -> bool:
    import timm  # local: importing timm costs a second, and only validation needs it here
    return name in timm.list_models() or timm.is_model(name)


def validate_config(cfg: Config, check_paths: bool = True) -> Config:
    b, t, d, e = cfg.brcd, cfg.train, cfg.data, cfg.eval
    _check(0.0 <= b.alpha <= 1.0, "brcd.alpha", b.alpha, "must be in [0, 1]")
    _check(0.0 <= b.delta <= 1.0, "brcd.delta", b.delta, "must be in [0, 1]")
    _check(b.clusters >= 2, "brcd.clusters", b.clusters, "must be an integer >= 2")
    _check(8 <= b.bits <= 256 and b.bits % 8 == 0, "brcd.bits", b.bits, "must be a multiple of 8 in 8..256")
    _check(b.tau > 0, "brcd.tau", b.tau, "must be > 0")
    _check(b.lambda_self >= 0, "brcd.lambda_self", b.lambda_self, "must be >= 0")
    _check(b.kd_weight >= 0, "brcd.kd_weight", b.kd_weight, "must be >= 0")
    # the KD-loss registry and the BRCD variants (local: importing the losses needs torch)
    from brcd_dist.losses import kd_names
    from brcd_dist.losses.brcd import check_variant
    _check(b.kd in kd_names(), "brcd.kd", b.kd, f"allowed: {', '.join(kd_names())}")
    try:
        check_variant(b.mask_normalization, b.mask_sides, b.cosine, b.negatives, b.authors_release, b.bit_mask)
    except ValueError as e:
        raise ConfigError(f"brcd.{e}") from None
    _check(b.recluster_every >= 0, "brcd.recluster_every", b.recluster_every, "must be >= 0")
    _check(cfg.kmeans.iters >= 1, "kmeans.iters", cfg.kmeans.iters, "must be >= 1")
    _check(cfg.kmeans.tol >= 0, "kmeans.tol", cfg.kmeans.tol, "must be >= 0")
    _check(t.workers >= 1, "train.workers", t.workers, "must be >= 1")
    _check(t.cpus_per_worker > 0, "train.cpus_per_worker", t.cpus_per_worker, "must be > 0")
    _check(t.placement_strategy in PLACEMENT_STRATEGIES, "train.placement_strategy", t.placement_strategy,
           f"allowed: {', '.join(PLACEMENT_STRATEGIES)}")
    _check(t.batch_size >= 2, "train.batch_size", t.batch_size, "must be >= 2 (contrastive losses need negatives)")
    _check(t.grad_accum >= 1, "train.grad_accum", t.grad_accum, "must be >= 1")
    _check(t.zero_stage in (0, 1, 2, 3), "train.zero_stage", t.zero_stage, "allowed: 0, 1, 2, 3")
    _check(t.epochs >= 1, "train.epochs", t.epochs, "must be >= 1")
    _check(t.teacher_epochs >= 0, "train.teacher_epochs", t.teacher_epochs, "must be >= 0")
    _check(t.teacher_split in TEACHER_SPLITS, "train.teacher_split", t.teacher_split, f"allowed: {', '.join(TEACHER_SPLITS)}")
    _check(t.lr > 0, "train.lr", t.lr, "must be > 0")
    _check(t.teacher_lr > 0, "train.teacher_lr", t.teacher_lr, "must be > 0")
    _check(t.checkpoint_every >= 1, "train.checkpoint_every", t.checkpoint_every, "must be >= 1")
    _check(t.eval_every >= 0, "train.eval_every", t.eval_every, "must be >= 0")
    _check(t.max_steps_per_epoch >= 0, "train.max_steps_per_epoch", t.max_steps_per_epoch, "must be >= 0")
    _check(t.max_failures >= 0, "train.max_failures", t.max_failures, "must be >= 0")
    _check(e.topk >= 1, "eval.topk", e.topk, "must be >= 1")
    _check(d.source in DATA_SOURCES, "data.source", d.source, f"allowed: {', '.join(DATA_SOURCES)}")
    _check(d.image_size >= 8, "data.image_size", d.image_size, "must be >= 8")
    _check(d.in_chans in (1, 3), "data.in_chans", d.in_chans, "allowed: 1, 3")
    _check(d.train_per_class >= 1, "data.train_per_class", d.train_per_class, "must be >= 1")
    _check(0.0 < d.val_fraction < 1.0, "data.val_fraction", d.val_fraction, "must be in (0, 1)")
    _check(d.samples_per_shard >= 1, "data.samples_per_shard", d.samples_per_shard, "must be >= 1")
    _check(d.loader_workers >= 0, "data.loader_workers", d.loader_workers, "must be >= 0")
    for role in ("teacher", "student"):
        m: ModelConfig = getattr(cfg, role)
        _check(m.head in HEADS, f"{role}.head", m.head, f"allowed: {', '.join(HEADS)}")
        if not m.uri:
            _check(_is_timm_model(m.name), f"{role}.name", m.name,
                   "not a timm model name (see timm.list_models())")
        if check_paths and m.weights_path:
            _check(Path(m.weights_path).is_file(), f"{role}.weights_path", m.weights_path, "file not found")
        if check_paths and m.uri and not m.uri.startswith(("models:/", "runs:/")):
            _check(Path(m.uri).exists(), f"{role}.uri", m.uri,
                   "file not found (allowed: models:/NAME@alias, runs:/..., or a checkpoint path)")
    if check_paths:
        has_manifest = (Path(d.shards_dir) / "manifest.json").is_file()
        if d.source == "shards" or (d.shards_url and not has_manifest):
            _check(has_manifest, "data.shards_dir", d.shards_dir, "no manifest.json there (make shards with jobs/make_shards.py)")
        elif not has_manifest:
            _check(Path(d.source_path).exists(), "data.source_path", d.source_path,
                   "not found" + (" (apt-get install dataset-fashion-mnist)" if d.source == "fashion_mnist" else ""))
    return cfg
