"""Hash models in MLflow: export and log one into a run, register it under NAME@alias with its role, load it back."""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import mlflow.artifacts
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from brcd_dist import __version__
from brcd_dist.run_guard import alias_may_move, alias_scores
from brcd_dist.tracking.client import MAX_TAG_VALUE, TrackingError, _client, _one_line, set_tracking_uri

if TYPE_CHECKING:
    import torch

ROLES = ("student", "teacher")
ROLE_TAG = "brcd.role"  # on a registered model: which role its versions play
HASH_MODEL_FILE = "hash_model.pt"  # brcd_dist checkpoint shipped beside the exported graph


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


def _public_version(package: str) -> str:
    from importlib.metadata import version

    from packaging.version import Version

    return Version(version(package)).public  # torch '2.14.1+cu130' -> '2.14.1': pip indexes have no local labels


def pip_requirements() -> list[str]:
    """What a logged hash model needs; explicit, so MLflow skips its slow requirement inference (about 10 s a model)."""
    return [f"torch=={_public_version('torch')}", f"timm=={_public_version('timm')}", f"brcd-dist=={__version__}"]


def _hash_model_checkpoint(model: Any, directory: str) -> list[str]:
    """[checkpoint path] for a brcd_dist HashModel (so load_model can rebuild the class, with encode), else []."""
    from brcd_dist.models import HashModel, save_hash_model  # local: models imports timm (seconds)

    if not isinstance(model, HashModel):
        return []
    path = os.path.join(directory, HASH_MODEL_FILE)
    save_hash_model(model, path)
    return [path]


def log_hash_model(
    run_id: str,
    model: torch.nn.Module,
    artifact_path: str,
    input_example: torch.Tensor,
    *,
    tracking_uri: str | None = None,
) -> str:
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
    entry = client.create_logged_model(
        client.get_run(run_id).info.experiment_id, name=artifact_path, source_run_id=run_id
    )
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
                export,
                input_example=example.numpy(),
                pip_requirements=pip_requirements(),
                extra_files=_hash_model_checkpoint(export, tmp) or None,
                serialization_format="pt2",
                model_id=entry.model_id,
                run_id=run_id,
                # MLflow would reload the graph and predict once to check the serving example: about a third of
                # the logging time. The tests load logged models in a fresh process instead.
                validate_serving_input=False,
            )
    finally:
        export.train(was_training)
    return info.model_uri


def register_model(
    model_uri: str,
    name: str,
    alias: str,
    tags: dict[str, Any],
    role: str,
    *,
    tracking_uri: str | None = None,
    force_alias: bool = False,
) -> str:
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
            name,
            alias,
            holder,
            mv.version,
            "no score" if new is None else f"{new:.4f}",
        )
    return str(mv.version)


def load_model(uri: str, *, exported: bool = False, tracking_uri: str | None = None) -> torch.nn.Module:
    """A hash model from models:/NAME@alias, models:/NAME/3, runs:/RUN/NAME, models:/m-... or a checkpoint file.

    Gives back the brcd_dist HashModel (forward, encode, .bits ...) when the logged model ships its checkpoint,
    else (or with exported=True) the torch.export graph via mlflow.pytorch.load_model (forward -> logits only).
    Always in eval mode.
    """
    if Path(uri).is_file():  # a checkpoint file: models.load_hash_model, which involves no MLflow
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

        with _no_pickle():
            return mlflow_pytorch.load_model(local)  # an exported graph is inference-only already (no .eval() on it)


@contextlib.contextmanager
def _no_pickle():
    """MLflow unpickles a logged model (model.pth, and the weights inside a .pt2 archive) unless
    MLFLOW_ALLOW_PICKLE_DESERIALIZATION is false (its default is true): set false for the call, so that a pickled model
    is refused and a .pt2 archive is first checked to hold only what torch's weights-only unpickler accepts."""
    key = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"
    before = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before
