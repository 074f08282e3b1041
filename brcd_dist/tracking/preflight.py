"""The pre-flight check of a job: the store answers and the registry names are usable, before any run or worker."""

from __future__ import annotations

import urllib.parse

from mlflow.exceptions import MlflowException

from brcd_dist.config import TrackingConfig
from brcd_dist.tracking.client import (
    TrackingError,
    _cached_client,
    _no_http_retries,
    _one_line,
    _probe_server,
    _sqlite_path,
    resolve_tracking_uri,
)
from brcd_dist.tracking.registry import _registry_clash


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
        raise TrackingError(
            f"tracking.student_name and tracking.teacher_name are both {cfg.student_name!r}; "
            "student and teacher need their own registered models"
        )
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
            clashes = (
                [
                    _registry_clash(client, name, role)
                    for role, name in (("student", cfg.student_name), ("teacher", cfg.teacher_name))
                ]
                if cfg.register
                else []
            )
    except MlflowException as e:
        raise TrackingError(f"tracking store {uri} cannot be used: {_one_line(e.message)}") from None
    if exp is not None and exp.lifecycle_stage == "deleted":
        raise TrackingError(
            f"experiment {cfg.experiment!r} is deleted in {uri}; restore it "
            f"(mlflow experiments restore -x {exp.experiment_id}) or set tracking.experiment"
        )
    for clash in clashes:
        if clash:
            raise TrackingError(clash)
    return uri
