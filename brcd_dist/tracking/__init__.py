"""MLflow at the edge of the pipeline: runs, metrics, artifacts, hash models and the model registry (DESIGN §1).

  client.py     tracking URIs, cached clients, TrackingError
  preflight.py  check_tracking: the store and the registry names, before any run or worker
  runs.py       start_run, end_run, fail_run and the failing_run guard around a job
  log.py        log_metrics, log_params, set_tags, log_artifact, log_text, log_dict, log_figure, flush
  registry.py   log_hash_model, register_model, load_model

Every call is keyed by a run id and goes through `MlflowClient`, never through MLflow's "active run": the driver
opens the run (`start_run`) before any Ray worker starts, hands the run id to the workers, and rank 0 (another
process, maybe another node) logs to the same run with `log_metrics(run_id, ...)`.

Each function takes an optional `tracking_uri`; without it MLflow's current URI is used. `start_run`,
`set_tracking_uri`, `log_hash_model`, `register_model` and `load_model` (the last three go through MLflow's fluent
API) make the URI the process's own; MLflow exports it as MLFLOW_TRACKING_URI, so child processes started
afterwards inherit it.
"""

from __future__ import annotations

from brcd_dist.tracking.client import (
    MAX_PARAM_VALUE,
    MAX_PARAMS_PER_BATCH,
    MAX_TAG_VALUE,
    TrackingError,
    resolve_tracking_uri,
    set_tracking_uri,
)
from brcd_dist.tracking.log import (
    flush,
    log_artifact,
    log_dict,
    log_figure,
    log_metrics,
    log_params,
    log_text,
    set_tags,
)
from brcd_dist.tracking.preflight import check_tracking
from brcd_dist.tracking.registry import (
    HASH_MODEL_FILE,
    ROLE_TAG,
    ROLES,
    load_model,
    log_hash_model,
    pip_requirements,
    register_model,
)
from brcd_dist.tracking.runs import (
    ERROR_TAG,
    GIT_TAG,
    MANIFEST_TAG,
    PARENT_TAG,
    RUN_STATUSES,
    end_run,
    fail_run,
    failing_run,
    git_commit,
    start_run,
)

__all__ = [
    "MAX_PARAM_VALUE",
    "MAX_PARAMS_PER_BATCH",
    "MAX_TAG_VALUE",
    "TrackingError",
    "resolve_tracking_uri",
    "set_tracking_uri",
    "flush",
    "log_artifact",
    "log_dict",
    "log_figure",
    "log_metrics",
    "log_params",
    "log_text",
    "set_tags",
    "check_tracking",
    "HASH_MODEL_FILE",
    "ROLE_TAG",
    "ROLES",
    "load_model",
    "log_hash_model",
    "pip_requirements",
    "register_model",
    "ERROR_TAG",
    "GIT_TAG",
    "MANIFEST_TAG",
    "PARENT_TAG",
    "RUN_STATUSES",
    "end_run",
    "fail_run",
    "failing_run",
    "git_commit",
    "start_run",
]
