"""Logging to a run by its id: metrics, params, tags, files, text, dicts and figures."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
from mlflow.entities import Metric, Param, RunTag

from brcd_dist.tracking.client import MAX_PARAMS_PER_BATCH, MAX_TAG_VALUE, _client, _param_value

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def log_metrics(
    run_id: str, metrics: dict[str, float], step: int, *, synchronous: bool = True, tracking_uri: str | None = None
) -> None:
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
        _client(tracking_uri).log_batch(run_id, params=items[i : i + MAX_PARAMS_PER_BATCH])


def set_tags(run_id: str, tags: dict[str, Any], *, tracking_uri: str | None = None) -> None:
    items = [RunTag(k, str(v)[:MAX_TAG_VALUE]) for k, v in tags.items()]
    _client(tracking_uri).log_batch(run_id, tags=items)


def log_artifact(
    run_id: str, path: str | os.PathLike, artifact_path: str | None = None, *, tracking_uri: str | None = None
) -> None:
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
