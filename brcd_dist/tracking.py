"""MLflow at the edge of the pipeline: runs, metrics, artifacts, hash models and the model registry (DESIGN §1).

Every call is keyed by a run id and goes through `MlflowClient`, never through MLflow's "active run": the driver
opens the run (`start_run`) before any Ray worker starts, hands the run id to the workers, and rank 0 (another
process, maybe another node) logs to the same run with `log_metrics(run_id, ...)`.

Each function takes an optional `tracking_uri`; without it MLflow's current URI is used. `start_run`,
`set_tracking_uri`, `log_hash_model`, `register_model` and `load_model` (the last three go through MLflow's fluent
API) make the URI the process's own; MLflow exports it as MLFLOW_TRACKING_URI, so child processes started
afterwards inherit it.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
import re
import subprocess
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import mlflow
import mlflow.artifacts
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from brcd_dist import __version__
from brcd_dist.config import Config, TrackingConfig, flatten
from brcd_dist.redact import redact
from brcd_dist.run_guard import alias_may_move, alias_scores

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure

ROLES = ("student", "teacher")
ROLE_TAG = "brcd.role"  # on a registered model: which role its versions play
GIT_TAG = "brcd.git_commit"
MANIFEST_TAG = "brcd.manifest_digest"
ERROR_TAG = "brcd.error"
PARENT_TAG = "mlflow.parentRunId"  # what nested runs set; the UI draws the tree from it
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
HASH_MODEL_FILE = "hash_model.pt"  # brcd_dist checkpoint shipped beside the exported graph

# MLflow's server-side limits (mlflow/utils/validation.py).
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_PARAMS_PER_BATCH = 100


class TrackingError(RuntimeError):
    """The tracking server or registry cannot be used as configured; the message is one line for the user."""


def _one_line(err: BaseException | str, limit: int = 300) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------- URIs and clients

def resolve_tracking_uri(uri: str) -> str:
    """'' -> sqlite:///<cwd>/mlflow.db (MLflow 3's own default, made absolute so workers share one file)."""
    return uri if uri else f"sqlite:///{Path.cwd()}/mlflow.db"


def set_tracking_uri(uri: str) -> str:
    """Point this process (and the child processes it starts later) at a tracking store; call once per worker."""
    uri = resolve_tracking_uri(uri)
    mlflow.set_tracking_uri(uri)  # also exports MLFLOW_TRACKING_URI
    return uri


@functools.lru_cache(maxsize=8)
def _cached_client(uri: str) -> MlflowClient:
    # Building a client for sqlite opens the engine and checks the schema: do it once per URI and process.
    return MlflowClient(tracking_uri=uri)  # registry: MLFLOW_REGISTRY_URI if set, else the same store


def _client(tracking_uri: str | None) -> MlflowClient:
    return _cached_client(tracking_uri or mlflow.get_tracking_uri())


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI (relative paths are relative to the cwd), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    path = urllib.parse.unquote(uri[len("sqlite:///"):].split("?", 1)[0])
    return None if path in ("", ":memory:") else Path(path)


@contextlib.contextmanager
def _no_http_retries(timeout_s: float) -> Iterator[None]:
    """MLflow's REST client retries for minutes by default; a pre-flight check must fail in seconds."""
    keys = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, round(timeout_s)))}
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _probe_server(uri: str, timeout_s: float) -> None:
    import requests  # a dependency of mlflow

    url = uri.rstrip("/") + "/health"
    try:
        resp = requests.get(url, timeout=(timeout_s, timeout_s))
    except requests.RequestException as e:
        reason = type(e).__name__ + (": connection refused" if "refused" in str(e).lower() else "")
        raise TrackingError(f"tracking server {uri} unreachable ({reason}); start it or set tracking.uri") from None
    if resp.status_code != 200:
        raise TrackingError(f"tracking server {uri} answered {url} with HTTP {resp.status_code}; "
                            "is tracking.uri an MLflow server?")


# ----------------------------------------------------------------------------- pre-flight check

def _registry_clash(client: MlflowClient, name: str, role: str) -> str | None:
    """Why registering `role` versions under `name` would mix models, or None."""
    try:
        model = client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    found = model.tags.get(ROLE_TAG)
    if found == role:
        return None
    what = f"holds {found} models" if found else f"was not made by brcd-dist (no {ROLE_TAG} tag)"
    return f"registered model {name!r} {what}; set tracking.{role}_name to another name"


def check_tracking(cfg: TrackingConfig, timeout_s: float = 3.0) -> str:
    """Fail fast, before any run or Ray worker exists: the store answers and the registry names are usable.

    Returns the resolved tracking URI. Raises a one-line TrackingError otherwise. Creates nothing: a sqlite file
    that does not exist yet is not opened (it cannot hold a clashing model), and a server is probed with one
    GET /health of at most `timeout_s` before any REST call, which then runs without MLflow's retries.
    """
    uri = resolve_tracking_uri(cfg.uri)
    if not cfg.enabled:
        return uri
    if cfg.register and cfg.student_name == cfg.teacher_name:
        raise TrackingError(f"tracking.student_name and tracking.teacher_name are both {cfg.student_name!r}; "
                            "student and teacher need their own registered models")
    scheme = urllib.parse.urlparse(uri).scheme
    db = _sqlite_path(uri)
    if scheme in ("http", "https"):
        _probe_server(uri, timeout_s)
    elif db is not None:
        if not db.parent.is_dir():
            raise TrackingError(f"tracking.uri={uri!r}: directory {str(db.parent)!r} does not exist")
        if not db.exists():
            return uri  # a fresh store: nothing to clash with, and nothing to create yet
    try:
        with _no_http_retries(timeout_s):
            client = _cached_client(uri)
            exp = client.get_experiment_by_name(cfg.experiment)
            clashes = ([_registry_clash(client, name, role)
                        for role, name in (("student", cfg.student_name), ("teacher", cfg.teacher_name))]
                       if cfg.register else [])
    except MlflowException as e:
        raise TrackingError(f"tracking store {uri} cannot be used: {_one_line(e.message)}") from None
    if exp is not None and exp.lifecycle_stage == "deleted":
        raise TrackingError(f"experiment {cfg.experiment!r} is deleted in {uri}; restore it "
                            f"(mlflow experiments restore -x {exp.experiment_id}) or set tracking.experiment")
    for clash in clashes:
        if clash:
            raise TrackingError(clash)
    return uri


# ----------------------------------------------------------------------------- runs

def git_commit(repo_dir: str | os.PathLike | None = None) -> str:
    """HEAD of the checkout that holds this package, or 'unknown' (an installed wheel, no git)."""
    where = Path(repo_dir) if repo_dir else Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= MAX_PARAM_VALUE else text[: MAX_PARAM_VALUE - 3] + "..."


def _artifact_location(uri: str, experiment: str) -> str | None:
    """Beside the database for a sqlite store (MLflow would use <cwd of whoever created the experiment>/mlruns);
    None (the server's choice) otherwise."""
    db = _sqlite_path(uri)
    if db is None:
        return None
    return (db.resolve().parent / "mlruns" / re.sub(r"[^A-Za-z0-9._-]+", "_", experiment)).as_uri()


def _experiment_id(client: MlflowClient, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=_artifact_location(client.tracking_uri, name))
        except MlflowException as e:  # a concurrent trial created it first
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            exp = client.get_experiment_by_name(name)
    if exp.lifecycle_stage == "deleted":
        raise TrackingError(f"experiment {name!r} is deleted; restore it or set tracking.experiment")
    return exp.experiment_id


def start_run(cfg: Config, *, run_name: str | None = None, parent_run_id: str | None = None,
              tags: dict[str, Any] | None = None, manifest_digest: str | None = None) -> str:
    """Open a run in experiment cfg.tracking.experiment (a child of parent_run_id if given) and return its id.

    Logs the flattened config as params and tags the git commit, the shard manifest digest and the parent. The run
    is not made MLflow's active run: log to it from any process by its id. A child run lives in its parent's
    experiment, so the UI nests it.
    """
    uri = set_tracking_uri(cfg.tracking.uri)
    client = _client(uri)
    try:
        if parent_run_id:
            experiment_id = client.get_run(parent_run_id).info.experiment_id
        else:
            experiment_id = _experiment_id(client, cfg.tracking.experiment)
        commit = git_commit()
        run_tags = {GIT_TAG: commit, "mlflow.source.git.commit": commit, "brcd.version": __version__}
        if manifest_digest:
            run_tags[MANIFEST_TAG] = manifest_digest
        if parent_run_id:
            run_tags[PARENT_TAG] = parent_run_id
        run_tags.update({k: str(v)[:MAX_TAG_VALUE] for k, v in (tags or {}).items()})
        run = client.create_run(experiment_id, tags=run_tags, run_name=run_name)
    except MlflowException as e:
        raise TrackingError(f"cannot open a run in {uri}: {_one_line(e.message)}") from None
    run_id = run.info.run_id
    params = [Param(k, _param_value(redact(v))) for k, v in flatten(cfg).items()]
    try:
        for i in range(0, len(params), MAX_PARAMS_PER_BATCH):
            client.log_batch(run_id, params=params[i:i + MAX_PARAMS_PER_BATCH])
    except MlflowException as e:
        client.delete_run(run_id)  # a run without its config is worthless: leave none behind
        raise TrackingError(f"cannot log the config to run {run_id}: {_one_line(e.message)}") from None
    return run_id


def log_metrics(run_id: str, metrics: dict[str, float], step: int, *, synchronous: bool = True,
                tracking_uri: str | None = None) -> None:
    """One batch call for all values of a step (one round trip, one sqlite transaction).

    synchronous=False queues the batch for MLflow's background thread, which merges queued steps into few
    requests: for per-step logging on rank 0 (a synchronous call to a server cost ~0.3 s here, queueing ~1 ms).
    Call `flush()` before the process ends; `end_run` and `fail_run` flush too.
    """
    if not metrics:
        return
    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()]
    _client(tracking_uri).log_batch(run_id, metrics=batch, synchronous=synchronous)


def flush() -> None:
    """Wait until every queued (synchronous=False) metric of this process is written."""
    mlflow.flush_async_logging()


def log_params(run_id: str, params: dict[str, Any], *, tracking_uri: str | None = None) -> None:
    items = [Param(k, _param_value(v)) for k, v in params.items()]
    for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
        _client(tracking_uri).log_batch(run_id, params=items[i:i + MAX_PARAMS_PER_BATCH])


def set_tags(run_id: str, tags: dict[str, Any], *, tracking_uri: str | None = None) -> None:
    items = [RunTag(k, str(v)[:MAX_TAG_VALUE]) for k, v in tags.items()]
    _client(tracking_uri).log_batch(run_id, tags=items)


def log_artifact(run_id: str, path: str | os.PathLike, artifact_path: str | None = None, *,
                 tracking_uri: str | None = None) -> None:
    """A local file or directory into the run's artifacts (under artifact_path)."""
    path = Path(path)
    client = _client(tracking_uri)
    if path.is_dir():
        client.log_artifacts(run_id, str(path), artifact_path)
    else:
        client.log_artifact(run_id, str(path), artifact_path)


def log_text(run_id: str, text: str, artifact_file: str, *, tracking_uri: str | None = None) -> None:
    _client(tracking_uri).log_text(run_id, text, artifact_file)


def log_dict(run_id: str, obj: dict, artifact_file: str, *, tracking_uri: str | None = None) -> None:
    """JSON or YAML by the file's extension (MLflow's rule)."""
    _client(tracking_uri).log_dict(run_id, obj, artifact_file)


def log_figure(run_id: str, fig: Figure, artifact_file: str, *, tracking_uri: str | None = None) -> None:
    """A matplotlib Figure (see brcd_dist.plots) as an image artifact, e.g. 'plots/loss.png'."""
    _client(tracking_uri).log_figure(run_id, fig, artifact_file)


def end_run(run_id: str, status: str = "FINISHED", *, tracking_uri: str | None = None) -> None:
    if status not in RUN_STATUSES:
        raise ValueError(f"status={status!r}: allowed: {', '.join(RUN_STATUSES)}")
    flush()
    _client(tracking_uri).set_terminated(run_id, status)


def fail_run(run_id: str, error: BaseException | str, *, tracking_uri: str | None = None) -> str:
    """Close the run of a failed job; returns 'deleted', 'failed' or 'killed'.

    Always tags the one-line reason and marks the run FAILED (KILLED for a KeyboardInterrupt). If no metric was logged yet (the job failed before
    training started), the run is also deleted: MLflow's delete is soft (lifecycle 'deleted'), so listings and
    sweep comparisons show only runs that trained, while the run, its config and its reason stay retrievable
    (`search_runs(run_view_type=ALL)`, `mlflow runs restore`) until `mlflow gc`. A run that trained keeps its
    curves in sight: those help to debug the failure.
    """
    flush()
    client = _client(tracking_uri)
    reason = redact(_one_line(f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else error, 1000))
    status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
    client.set_tag(run_id, ERROR_TAG, reason)
    client.set_terminated(run_id, status)
    if client.get_run(run_id).data.metrics:
        return status.lower()
    client.delete_run(run_id)
    return "deleted"


# ----------------------------------------------------------------------------- models and registry

def _public_version(package: str) -> str:
    from importlib.metadata import version

    from packaging.version import Version
    return Version(version(package)).public  # torch '2.14.1+cu130' -> '2.14.1': pip indexes have no local labels


def pip_requirements() -> list[str]:
    """What a logged hash model needs; explicit, so MLflow skips its slow requirement inference (STACK.md)."""
    return [f"torch=={_public_version('torch')}", f"timm=={_public_version('timm')}", f"brcd-dist=={__version__}"]


def _hash_model_checkpoint(model: Any, directory: str) -> list[str]:
    """[checkpoint path] for a brcd_dist HashModel (so load_model can rebuild the class, with encode), else []."""
    from brcd_dist.models import HashModel, save_hash_model  # local: models imports timm (seconds)
    if not isinstance(model, HashModel):
        return []
    path = os.path.join(directory, HASH_MODEL_FILE)
    save_hash_model(model, path)
    return [path]


def log_hash_model(run_id: str, model: torch.nn.Module, artifact_path: str, input_example: torch.Tensor, *,
                   tracking_uri: str | None = None) -> str:
    """Log a hash model into the run as an MLflow model and return its model URI ('models:/m-...').

    The model is exported with torch.export (MLflow 3's pt2 format: forward -> logits, loadable without this
    package) in eval mode on the CPU, with a dynamic batch size; a HashModel also ships its brcd_dist checkpoint
    so that `load_model` gives back the HashModel itself. `runs:/<run_id>/<artifact_path>` resolves to it too.
    """
    import torch
    from mlflow import pytorch as mlflow_pytorch  # imports torch: only where a model is handled

    uri = set_tracking_uri(tracking_uri or mlflow.get_tracking_uri())  # log_model writes through the fluent API
    client = _client(uri)
    # Left to itself, MLflow 3 files the model under the process's active experiment (Default), not its run's, and
    # runs:/<run_id>/<name> then finds nothing: create the model entry in the run's experiment first.
    entry = client.create_logged_model(client.get_run(run_id).info.experiment_id, name=artifact_path,
                                       source_run_id=run_id)
    example = input_example.detach().to("cpu", torch.float32)
    if example.shape[0] < 2:  # torch.export fixes a size-1 dimension: the batch would be frozen at 1
        example = example.expand(2, *example.shape[1:]).contiguous()
    on_cpu = all(t.device.type == "cpu" for t in model.parameters())
    export = model if on_cpu else copy.deepcopy(model).cpu()
    was_training = export.training
    export.eval()  # the exported graph freezes BatchNorm/dropout mode: it must be inference mode
    try:
        with tempfile.TemporaryDirectory() as tmp:
            info = mlflow_pytorch.log_model(
                export, input_example=example.numpy(), pip_requirements=pip_requirements(),
                extra_files=_hash_model_checkpoint(export, tmp) or None, serialization_format="pt2",
                model_id=entry.model_id, run_id=run_id,
                # MLflow would reload the graph and predict once to check the serving example: about a third of
                # the logging time. The tests load logged models in a fresh process instead.
                validate_serving_input=False)
    finally:
        export.train(was_training)
    return info.model_uri


def register_model(model_uri: str, name: str, alias: str, tags: dict[str, Any], role: str, *,
                   tracking_uri: str | None = None, force_alias: bool = False) -> str:
    """Register model_uri as a new version of `name`, tag it, and point `alias` at it when its test mAP (tag
    SCORE_TAGS[role]) is at least the current holder's, or force_alias (run_guard.alias_may_move); returns the
    version.

    The registered model carries tag brcd.role = role; registering a student under a teacher's name (or under a
    model made by something else) raises TrackingError instead of mixing the two.
    """
    if role not in ROLES:
        raise ValueError(f"role={role!r}: allowed: {', '.join(ROLES)}")
    client = _client(set_tracking_uri(tracking_uri or mlflow.get_tracking_uri()))
    clash = _registry_clash(client, name, role)
    if clash:
        raise TrackingError(clash)
    try:
        client.create_registered_model(name, tags={ROLE_TAG: role})
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version_tags = {ROLE_TAG: role, **{k: str(v)[:MAX_TAG_VALUE] for k, v in tags.items()}}
    mv = mlflow.register_model(model_uri, name, tags=version_tags)  # resolves models:/m-... and runs:/ sources
    holder, new = alias_scores(client, name, alias, role, version_tags)
    if alias_may_move(holder, new, force_alias):
        client.set_registered_model_alias(name, alias, mv.version)
    else:
        logging.getLogger("brcd_dist").warning(
            "models:/%s@%s stays on the version with test mAP %.4f: version %s has %s (force with --force-alias)",
            name, alias, holder, mv.version, "no score" if new is None else f"{new:.4f}")
    return str(mv.version)


def load_model(uri: str, *, exported: bool = False, tracking_uri: str | None = None) -> torch.nn.Module:
    """A hash model from models:/NAME@alias, models:/NAME/3, runs:/RUN/NAME, models:/m-... or a checkpoint file.

    Gives back the brcd_dist HashModel (forward, encode, .bits ...) when the logged model ships its checkpoint,
    else (or with exported=True) the torch.export graph via mlflow.pytorch.load_model (forward -> logits only).
    Always in eval mode.
    """
    if Path(uri).is_file():
        from brcd_dist.models import load_hash_model
        return load_hash_model(uri).eval()
    if tracking_uri:
        set_tracking_uri(tracking_uri)  # models:/NAME@alias resolves through the process's registry URI
    with tempfile.TemporaryDirectory() as tmp:  # both loaders read everything into memory: drop the copy after
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp)
        except MlflowException as e:
            raise TrackingError(f"cannot load model {uri}: {_one_line(e.message)}") from None
        checkpoint = Path(local, "extra_files", HASH_MODEL_FILE)
        if checkpoint.is_file() and not exported:
            from brcd_dist.models import load_hash_model
            return load_hash_model(str(checkpoint)).eval()
        from mlflow import pytorch as mlflow_pytorch
        return mlflow_pytorch.load_model(local)  # an exported graph is inference-only already (no .eval() on it)

