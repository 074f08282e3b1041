"""Run lifecycle: open a run (config as params, git commit and shard manifest as tags), close it, fail it."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from pathlib import Path
from typing import Any, Callable, Iterator

from mlflow import MlflowClient
from mlflow.entities import Param
from mlflow.exceptions import MlflowException

from brcd_dist import __version__
from brcd_dist.config import Config, flatten
from brcd_dist.redact import redact
from brcd_dist.tracking.client import (
    MAX_PARAMS_PER_BATCH,
    MAX_TAG_VALUE,
    TrackingError,
    _client,
    _one_line,
    _param_value,
    _sqlite_path,
    set_tracking_uri,
)
from brcd_dist.tracking.log import flush

GIT_TAG = "brcd.git_commit"
MANIFEST_TAG = "brcd.manifest_digest"
ERROR_TAG = "brcd.error"
PARENT_TAG = "mlflow.parentRunId"  # what nested runs set; the UI draws the tree from it
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")


def git_commit(repo_dir: str | os.PathLike | None = None) -> str:
    """HEAD of the checkout that holds this package, or 'unknown' (an installed wheel, no git)."""
    where = Path(repo_dir) if repo_dir else Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


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


def start_run(
    cfg: Config,
    *,
    run_name: str | None = None,
    parent_run_id: str | None = None,
    tags: dict[str, Any] | None = None,
    manifest_digest: str | None = None,
) -> str:
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
            client.log_batch(run_id, params=params[i : i + MAX_PARAMS_PER_BATCH])
    except MlflowException as e:
        client.delete_run(run_id)  # a run without its config is worthless: leave none behind
        raise TrackingError(f"cannot log the config to run {run_id}: {_one_line(e.message)}") from None
    return run_id


def end_run(run_id: str, status: str = "FINISHED", *, tracking_uri: str | None = None) -> None:
    if status not in RUN_STATUSES:
        raise ValueError(f"status={status!r}: allowed: {', '.join(RUN_STATUSES)}")
    flush()
    _client(tracking_uri).set_terminated(run_id, status)


def fail_run(run_id: str, error: BaseException | str, *, tracking_uri: str | None = None) -> str:
    """Close the run of a failed job; returns 'deleted', 'failed' or 'killed'.

    Always tags the one-line reason and marks the run FAILED (KILLED for a KeyboardInterrupt). If no metric was
    logged yet (the job failed before
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


@contextlib.contextmanager
def failing_run(run_id: str | None, on_failure: Callable[[str], None] | None = None) -> Iterator[None]:
    """Around a job's body: if it raises, `on_failure(run_id)` (if given), then `fail_run` with the error, which
    then goes on. Nothing is done for run_id None (tracking off)."""
    try:
        yield
    except BaseException as err:
        if run_id:
            if on_failure is not None:
                on_failure(run_id)
            fail_run(run_id, err)
        raise
