"""Typed configuration: dataclass defaults <- YAML file <- `key=value` overrides.

Every job resolves its config here, before any Ray worker starts, and every bad
value raises `ConfigError` with one line naming the key, the value and what is
allowed (DESIGN §1; dinov2-style defaults/experiment/CLI merge). Each section's
rules sit next to its fields (`validate`); `validate_config` adds the rules that
span sections or look at the disk (paths, the source's classes and images).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, get_type_hints

import yaml

HEADS = ("linear", "mlp", "classifier_mlp")
TEACHER_SPLITS = ("train", "database")
PRECISIONS = ("auto", "bf16", "fp32")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
MAX_IMAGE_SIZE = 4096  # data.image_size above this builds tensors of tens of GB (100000 px: 40 GB)


class ConfigError(ValueError):
    """A bad configuration value; the message is one line meant for the user."""


def _check(cond: bool, key: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"{key}={value!r}: {allowed}")


def _choice(key: str, value: Any, allowed: tuple) -> None:
    _check(value in allowed, key, value, f"allowed: {', '.join(map(str, allowed))}")


def _check_endpoint(key: str, url: str) -> None:
    """An S3 endpoint is http(s)://HOST[:PORT] and carries no credentials (those come from the standard chain)."""
    if not url:
        return
    from brcd_dist.redact import redact

    scheme, _, rest = url.partition("://")
    host = rest.split("/", 1)[0]
    _check(
        scheme in ("http", "https") and bool(host) and "@" not in host,
        key,
        redact(url),
        "must be http(s)://HOST[:PORT], without credentials (they come from AWS_* variables, a profile or a role)",
    )


@dataclass
class DataConfig:
    source: str = "fashion_mnist"  # shards made from: fashion_mnist | imagefolder | object_store_folder | shards (made)
    source_path: str = "/usr/share/datasets/fashion-mnist"  # the IDX files' folder, or the ImageFolder root (or s3://)
    shards_dir: str = "data/fashion_mnist"  # local directory holding manifest.json + shards when shards_url is ""
    shards_url: str = ""  # shards + manifest at s3://, gs:// (no shards_dir); http(s)://, pipe:...{shard}: shards
    image_size: int = 32  # side of the images the models see, 8..4096
    in_chans: int = 1  # 1 (gray) or 3 (RGB)
    train_per_class: int = 500  # labelled training images of each class (the train split); at most what a class holds
    val_fraction: float = 0.5  # share of the test images used as validation queries (rest: test queries)
    samples_per_shard: int = 1000  # images per tar shard
    shard_shorter_side: int = 0  # ImageFolder shards: resize once to this shorter side (JPEG stays JPEG); 0 = keep
    shard_readers: int = 0  # expected ranks x loader workers: at least this many shards a split; 0 = no minimum
    split_seed: int = 0  # seed of the train/database/query split
    loader_workers: int = 1  # data-loading processes per rank (0: in the training process)
    max_image_pixels: int = 40_000_000  # ImageFolder images above this many pixels are skipped unread (0: no cap)
    max_member_bytes: int = 64 << 20  # shard tar members above this many bytes are skipped unread (0: no cap)
    max_images: int = 0  # only the first N training and N test images go into the shards (smoke runs; 0: all)

    def validate(self, s: str = "data") -> None:
        from brcd_dist.data import sources  # lists its modules' names, imports none of them

        _choice(f"{s}.source", self.source, (*sources.names(), "shards"))
        _check(
            8 <= self.image_size <= MAX_IMAGE_SIZE,
            f"{s}.image_size",
            self.image_size,
            f"must be in 8..{MAX_IMAGE_SIZE}",
        )
        _choice(f"{s}.in_chans", self.in_chans, (1, 3))
        _check(self.train_per_class >= 1, f"{s}.train_per_class", self.train_per_class, "must be >= 1")
        _check(0.0 < self.val_fraction < 1.0, f"{s}.val_fraction", self.val_fraction, "must be in (0, 1)")
        _check(self.samples_per_shard >= 1, f"{s}.samples_per_shard", self.samples_per_shard, "must be >= 1")
        _check(self.loader_workers >= 0, f"{s}.loader_workers", self.loader_workers, "must be >= 0")
        _check(
            self.shard_shorter_side >= 0, f"{s}.shard_shorter_side", self.shard_shorter_side, "must be >= 0 (0: keep)"
        )
        _check(self.shard_readers >= 0, f"{s}.shard_readers", self.shard_readers, "must be >= 0 (0: no minimum)")
        _check(self.max_image_pixels >= 0, f"{s}.max_image_pixels", self.max_image_pixels, "must be >= 0 (0: no cap)")
        _check(self.max_member_bytes >= 0, f"{s}.max_member_bytes", self.max_member_bytes, "must be >= 0 (0: no cap)")
        _check(self.max_images >= 0, f"{s}.max_images", self.max_images, "must be >= 0 (0: all)")


@dataclass
class ModelConfig:
    name: str = "resnet18"  # any timm model name
    pretrained: bool = False  # timm weights (needs internet) unless weights_path is set
    weights_path: str = ""  # local state_dict for the backbone
    frozen_backbone: bool = False  # frozen pretrained backbone, BN in eval mode (paper setting)
    head: str = "linear"  # linear: feat->L ; mlp: feat->1000->1000->L ; classifier_mlp: logits->1000->L (the paper's)
    uri: str = ""  # an existing hash model: models:/NAME@alias, runs:/..., or a checkpoint file

    def validate(self, s: str) -> None:
        _choice(f"{s}.head", self.head, HEADS)

    def validate_names(self, s: str) -> None:
        """The rule that needs timm's registry (importing timm imports torch: run after every other rule)."""
        if not self.uri:
            _check(_is_timm_model(self.name), f"{s}.name", self.name, "not a timm model name (see timm.list_models())")


@dataclass
class BRCDConfig:
    bits: int = 64  # code length L, a multiple of 8 in 8..256
    alpha: float = 0.8  # weight of the structural-semantic term, in [0, 1]
    delta: float = 0.5  # bit-mask agreement threshold, in [0, 1]
    clusters: int = 10  # k-means clusters K over the teacher's codes, 2..size of the train split
    tau: float = 0.3  # contrastive temperature, > 0
    lambda_self: float = 1.0  # weight of the student's own CIBHash loss, >= 0
    kd: str = "brcd"  # brcd | none (student alone) | a KD baseline
    kd_weight: float = 1.0  # weight of the KD loss, >= 0
    structural: bool = True  # structural-semantic positive term
    cluster_removal: bool = True  # false-negative removal and offset-positive rule
    bit_mask: bool = True  # per-cluster bit masks
    # BRCD variants (losses/brcd.py). The defaults are DESIGN §2.
    mask_normalization: str = "kept"  # a masked similarity over: kept (the kept bits) | length (L)
    mask_sides: str = "anchor"  # mask every code with: anchor (the anchor's cluster mask) | both (its own image's)
    cosine: str = "dot"  # dot (a·b over the normaliser) | normalised (the authors' nn.CosineSimilarity)
    negatives: str = "all"  # all ({s_j, s'_j, t_j, t'_j}) | authors ({s_j, t'_j})
    authors_release: bool = False  # the authors' shipped all-zero masks: an individual-only pull
    recluster_every: int = 0  # re-run k-means every R student epochs (0: once)

    def validate(self, s: str = "brcd") -> None:
        _check(0.0 <= self.alpha <= 1.0, f"{s}.alpha", self.alpha, "must be in [0, 1]")
        _check(0.0 <= self.delta <= 1.0, f"{s}.delta", self.delta, "must be in [0, 1]")
        _check(self.clusters >= 2, f"{s}.clusters", self.clusters, "must be an integer >= 2")
        _check(
            8 <= self.bits <= 256 and self.bits % 8 == 0, f"{s}.bits", self.bits, "must be a multiple of 8 in 8..256"
        )
        _check(self.tau > 0, f"{s}.tau", self.tau, "must be > 0")
        _check(self.lambda_self >= 0, f"{s}.lambda_self", self.lambda_self, "must be >= 0")
        _check(self.kd_weight >= 0, f"{s}.kd_weight", self.kd_weight, "must be >= 0")
        _check(self.recluster_every >= 0, f"{s}.recluster_every", self.recluster_every, "must be >= 0")

    def validate_names(self, s: str = "brcd") -> None:
        """The KD-loss registry and the BRCD variants (importing the losses imports torch: run after every other
        rule)."""
        from brcd_dist.losses import kd_names
        from brcd_dist.losses.brcd import check_variant

        _choice(f"{s}.kd", self.kd, kd_names())
        try:
            check_variant(
                self.mask_normalization,
                self.mask_sides,
                self.cosine,
                self.negatives,
                self.authors_release,
                self.bit_mask,
            )
        except ValueError as e:
            raise ConfigError(f"{s}.{e}") from None


@dataclass
class KMeansConfig:
    iters: int = 25  # Lloyd iterations, >= 1
    tol: float = 1e-4  # relative inertia change that stops early, >= 0
    spherical: bool = False  # cosine k-means (unit-norm centroids)
    seed: int = 0  # initialisation seed

    def validate(self, s: str = "kmeans") -> None:
        _check(self.iters >= 1, f"{s}.iters", self.iters, "must be >= 1")
        _check(self.tol >= 0, f"{s}.tol", self.tol, "must be >= 0")


@dataclass
class TrainConfig:
    workers: int = 2  # Ray Train workers (ranks), >= 1
    use_gpu: bool = False  # one GPU per worker
    cpus_per_worker: float = 1.0  # CPUs Ray reserves per worker, > 0
    placement_strategy: str = "PACK"  # Ray placement of the workers: PACK | SPREAD | STRICT_PACK | STRICT_SPREAD
    teacher_epochs: int = 3  # stage A epochs (0: the teacher as given)
    teacher_split: str = "database"  # unlabelled images the teacher learns from: train subset or all database images
    teacher_lr: float = 1e-3  # > 0
    epochs: int = 10  # student epochs
    batch_size: int = 64  # per-worker micro-batch, >= 2
    grad_accum: int = 1  # micro-batches per optimiser step, >= 1
    lr: float = 1e-3  # student learning rate, > 0
    weight_decay: float = 0.0  # AdamW weight decay
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0..3
    precision: str = "auto"  # auto (bf16 on a GPU that has it, else fp32) | bf16 (also on CPU) | fp32
    seed: int = 0  # model initialisation and data order
    max_steps_per_epoch: int = 0  # 0: the whole split
    checkpoint_every: int = 200  # steps
    eval_every: int = 1  # epochs; validation mAP for model selection
    early_stop_patience: int = 0  # evaluations without improvement (0: off)
    max_failures: int = 2  # worker-group restarts from the last checkpoint
    storage_path: str = "runs"  # local directory or s3:// / gs:// URI where Ray keeps checkpoints
    s3_endpoint: str = ""  # S3-compatible store (MinIO, Ceph, R2) for every s3:// path; "" = AWS_ENDPOINT_URL
    name: str = ""  # run name under storage_path; "" makes a unique one from the time
    resume_anyway: bool = False  # resume a run of this name even if it was started with another config
    teacher_cache: str = ""  # the teacher's codes and k-means results; "" = {storage_path}/teachers/cache

    def validate(self, s: str = "train") -> None:
        _check(self.workers >= 1, f"{s}.workers", self.workers, "must be >= 1")
        _check(self.cpus_per_worker > 0, f"{s}.cpus_per_worker", self.cpus_per_worker, "must be > 0")
        _choice(f"{s}.placement_strategy", self.placement_strategy, PLACEMENT_STRATEGIES)
        _check(
            self.batch_size >= 2, f"{s}.batch_size", self.batch_size, "must be >= 2 (contrastive losses need negatives)"
        )
        _check(self.grad_accum >= 1, f"{s}.grad_accum", self.grad_accum, "must be >= 1")
        _choice(f"{s}.zero_stage", self.zero_stage, (0, 1, 2, 3))
        _choice(f"{s}.precision", self.precision, PRECISIONS)
        _check(self.epochs >= 1, f"{s}.epochs", self.epochs, "must be >= 1")
        _check(self.teacher_epochs >= 0, f"{s}.teacher_epochs", self.teacher_epochs, "must be >= 0")
        _choice(f"{s}.teacher_split", self.teacher_split, TEACHER_SPLITS)
        _check(self.lr > 0, f"{s}.lr", self.lr, "must be > 0")
        _check(self.teacher_lr > 0, f"{s}.teacher_lr", self.teacher_lr, "must be > 0")
        _check(self.weight_decay >= 0, f"{s}.weight_decay", self.weight_decay, "must be >= 0")
        _check(self.checkpoint_every >= 1, f"{s}.checkpoint_every", self.checkpoint_every, "must be >= 1")
        _check(self.eval_every >= 0, f"{s}.eval_every", self.eval_every, "must be >= 0")
        _check(self.early_stop_patience >= 0, f"{s}.early_stop_patience", self.early_stop_patience, "must be >= 0")
        _check(self.max_steps_per_epoch >= 0, f"{s}.max_steps_per_epoch", self.max_steps_per_epoch, "must be >= 0")
        _check(self.max_failures >= 0, f"{s}.max_failures", self.max_failures, "must be >= 0")
        _check(
            "/" not in self.name and self.name not in (".", ".."),
            f"{s}.name",
            self.name,
            "must be a plain name (no '/', not '.' or '..')",
        )
        _check_endpoint(f"{s}.s3_endpoint", self.s3_endpoint)


@dataclass
class EvalConfig:
    topk: int = 1000  # mAP@topk, >= 1
    batch_size: int = 256  # images per encoding batch, >= 1
    max_queries: int = 0  # queries evaluated, drawn seeded and even across classes (0: all; the table says so)
    max_database: int = 0  # database items ranked, drawn the same way (0: all)
    pr_curves: bool = True  # precision-recall curves of the test queries (from at most 5,000 of them)

    def validate(self, s: str = "eval") -> None:
        _check(self.topk >= 1, f"{s}.topk", self.topk, "must be >= 1")
        _check(self.batch_size >= 1, f"{s}.batch_size", self.batch_size, "must be >= 1")
        _check(self.max_queries >= 0, f"{s}.max_queries", self.max_queries, "must be >= 0 (0: all)")
        _check(self.max_database >= 0, f"{s}.max_database", self.max_database, "must be >= 0 (0: all)")


@dataclass
class TrackingConfig:
    enabled: bool = True  # log to MLflow
    uri: str = ""  # "" : sqlite:///<cwd>/mlflow.db
    experiment: str = "brcd-dist"  # MLflow experiment name
    register: bool = True  # register the models in the MLflow registry
    student_name: str = "brcd-student"  # registered model name of the student
    teacher_name: str = "brcd-teacher"  # registered model name of the teacher
    alias: str = "candidate"  # alias given to a new version whose test mAP is at least the holder's
    force_alias: bool = False  # move the alias to the new version even if its test mAP is below the holder's

    def validate(self, s: str = "tracking") -> None:
        for key in ("experiment", "student_name", "teacher_name", "alias"):
            _check(bool(getattr(self, key)), f"{s}.{key}", getattr(self, key), "must not be empty")


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

    def validate(self, names: bool = True) -> None:
        """Each section's own rules, in the order of the fields above; then (names) the model and KD-loss names."""
        for f in fields(self):
            getattr(self, f.name).validate(f.name)
        if names:
            self.validate_names()

    def validate_names(self) -> None:
        """The rules that read timm's and the KD losses' registries. Importing those imports torch (seconds), so
        they run last: every other bad value is refused before torch is imported."""
        for f in fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate_names"):
                section.validate_names(f.name)


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
        except (ValueError, OverflowError):
            raise ConfigError(f"{key}={raw!r}: expected an integer") from None
    if typ is float:
        if isinstance(raw, bool):
            raise ConfigError(f"{key}={raw!r}: expected a number")
        try:
            value = float(raw)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{key}={raw!r}: expected a number") from None
        if not math.isfinite(value):
            raise ConfigError(f"{key}={raw!r}: expected a finite number (not inf or nan)")
        return value
    if typ is str:
        if isinstance(raw, (list, dict, tuple, set)):
            raise ConfigError(f"{key}={raw!r}: expected a string, not a {type(raw).__name__} (quote it)")
        return "" if raw is None else str(raw)
    raise ConfigError(f"{key}: unsupported type {typ}")


# Keys that moved: the old name is still read, with a one-line notice on stderr.
RENAMED = {("brcd", "clustering_cache"): ("train", "teacher_cache")}


def _renamed(data: Any) -> Any:
    """`data` (a config mapping) with each old key of RENAMED moved to its new place."""
    if not isinstance(data, dict):
        return data
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for (old_section, old), (new_section, new) in RENAMED.items():
        section = data.get(old_section)
        if isinstance(section, dict) and old in section:
            import sys

            print(
                f"warning: {old_section}.{old} is now {new_section}.{new} (the old name still works; rename it)",
                file=sys.stderr,
            )
            target = data.setdefault(new_section, {})
            if isinstance(target, dict):
                target.setdefault(new, section.pop(old))
    return data


def _apply(obj: Any, data: dict, prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}={data!r}: expected a mapping")
    hints = get_type_hints(type(obj))
    names = {f.name for f in fields(obj)}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise ConfigError(
                f"unknown key {key!r}; allowed under {prefix.rstrip('.') or 'the top level'}: "
                f"{', '.join(sorted(names))}"
            )
        cur = getattr(obj, k)
        if is_dataclass(cur):
            _apply(cur, v, key + ".")
        else:
            setattr(obj, k, _coerce(key, v, hints[k]))


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML parser error as one line: 'line L, column C: problem'."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return " ".join(f"{where}{problem}".split())


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
        try:
            node[parts[-1]] = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError as err:
            raise ConfigError(
                f"override {item!r}: not valid YAML ({_yaml_problem(err)}); quote the value, e.g. key='a: b'"
            ) from None
    return tree


def load_config(
    path: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    validate: bool = True,
    training: bool = True,
) -> Config:
    """Defaults, then the YAML file, then overrides; validated unless told otherwise (training=False: for a job
    that only makes shards, brcd.clusters is not checked against the train split)."""
    cfg = Config()
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--config {str(path)!r}: file not found")
        try:
            with open(p) as f:
                data = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"--config {str(path)!r}: not valid YAML ({_yaml_problem(err)})") from None
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"--config {str(path)!r}: cannot be read ({err.__class__.__name__})") from None
        _apply(cfg, _renamed(data))
    if overrides:
        _apply(cfg, _renamed(parse_overrides(overrides)))
    if validate:
        validate_config(cfg, training=training)
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


# Keys that do not change what a run computes: a run may resume under other values of them.
DIGEST_IGNORES = (
    "train.name",
    "train.storage_path",
    "train.max_failures",
    "train.resume_anyway",
    "train.teacher_cache",  # where results are cached, not what they are
    "data.loader_workers",
    "tracking.",
)


def config_digest(cfg: Config) -> str:
    """A short sha256 of the config, without the keys that only name, place or log a run (DIGEST_IGNORES): what
    state.json records, so that a run name is not silently resumed under another config."""
    import hashlib
    import json

    kept = {k: v for k, v in flatten(cfg).items() if not k.startswith(DIGEST_IGNORES)}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- validation across sections and on disk


def _is_timm_model(name: str) -> bool:
    import timm  # local: importing timm costs a second, and only validation needs it here

    return name in timm.list_models() or timm.is_model(name)


def _not_a_file(key: str, path: str) -> None:
    _check(not path or not Path(path).exists() or Path(path).is_dir(), key, path, "is a file; expected a directory")


def _train_split_size(cfg: Config) -> tuple[int, str] | None:
    """(images in the train split, where that number comes from) before any shard is written, or None when the
    source cannot tell; refuses a train_per_class above what a class holds and an ImageFolder of one class."""
    d = cfg.data
    manifest = Path(d.shards_dir) / "manifest.json"
    if manifest.is_file():
        import json

        try:
            return int(json.loads(manifest.read_text())["splits"]["train"]["count"]), f"{manifest}"
        except (OSError, ValueError, KeyError, TypeError):
            return None  # an unreadable manifest is reported by the shard checks that follow
    if d.source == "shards":
        return None
    from brcd_dist.data import sources

    try:
        return sources.get(d.source).train_split_size(d)
    except sources.TooFewPerClass as err:
        raise ConfigError(f"data.train_per_class={d.train_per_class!r}: {err}") from None
    except ValueError as err:  # a source it cannot use (no class folders, one class, ...)
        raise ConfigError(f"data.source_path={d.source_path!r}: {err}") from None


def _missing_hint(source: str) -> str:
    from brcd_dist.data import sources

    return sources.get(source).MISSING_HINT if source in sources.names() else ""


def validate_config(cfg: Config, check_paths: bool = True, training: bool = True) -> Config:
    """Every section's rules, then (check_paths) those that look at the disk: files that must exist, directories
    that must not be files, and the source's classes and images against train_per_class and brcd.clusters. The
    model and KD-loss names come last: their registries import torch (seconds), every other rule needs no torch."""
    cfg.validate(names=False)
    if check_paths:
        _validate_on_disk(cfg, training)
    cfg.validate_names()
    return cfg


def _validate_on_disk(cfg: Config, training: bool) -> None:
    d = cfg.data
    for role in ("teacher", "student"):
        m: ModelConfig = getattr(cfg, role)
        if m.weights_path:
            _check(Path(m.weights_path).is_file(), f"{role}.weights_path", m.weights_path, "file not found")
        if m.uri and not m.uri.startswith(("models:/", "runs:/")) and "://" not in m.uri:
            _check(
                Path(m.uri).exists(),
                f"{role}.uri",
                m.uri,
                "file not found (allowed: models:/NAME@alias, runs:/..., or a checkpoint path)",
            )
    _not_a_file("data.shards_dir", d.shards_dir)
    _not_a_file("train.teacher_cache", cfg.train.teacher_cache)
    if "://" not in cfg.train.storage_path:
        _not_a_file("train.storage_path", cfg.train.storage_path)
    remote_manifest = (
        bool(d.shards_url)
        and "{shard}" not in d.shards_url
        and "://" in d.shards_url
        and not d.shards_url.startswith(("http://", "https://"))
    )  # read with the shards: checked in preflight
    if not remote_manifest:
        has_manifest = (Path(d.shards_dir) / "manifest.json").is_file()
        if d.source == "shards" or (d.shards_url and not has_manifest):
            _check(
                has_manifest,
                "data.shards_dir",
                d.shards_dir,
                "no manifest.json there (make shards with jobs/make_shards.py)",
            )
        elif not has_manifest:
            _check(
                "://" in d.source_path or Path(d.source_path).exists(),  # a store's prefix: listed by the writer
                "data.source_path",
                d.source_path,
                "not found" + _missing_hint(d.source),
            )
    split = _train_split_size(cfg)
    if split is not None and training:
        n, where = split
        _check(
            cfg.brcd.clusters <= n,
            "brcd.clusters",
            cfg.brcd.clusters,
            f"must be <= {n}, the images of the train split ({where})",
        )
