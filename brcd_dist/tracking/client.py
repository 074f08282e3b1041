"""The tracking store: URIs, cached clients, MLflow's server-side limits and the one-line error of this package."""

from __future__ import annotations

import contextlib
import functools
import os
import urllib.parse
from pathlib import Path
from typing import Any, Iterator

import mlflow
from mlflow import MlflowClient

# MLflow's server-side limits (mlflow/utils/validation.py).
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_PARAMS_PER_BATCH = 100


class TrackingError(RuntimeError):
    """The tracking server or registry cannot be used as configured; the message is one line for the user."""


def _one_line(err: BaseException | str, limit: int = 300) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= MAX_PARAM_VALUE else text[: MAX_PARAM_VALUE - 3] + "..."


# ----------------------------------------------------------------------------- URIs and clients


def resolve_tracking_uri(uri: str) -> str:
    """'' -> sqlite:///<root>/mlflow.db (MLflow 3's own default, made absolute so workers share one file; the root
    is storage.output_root(): the cwd, but not the temporary working dir of a submitted Ray job)."""
    from brcd_dist.storage import output_root

    return uri if uri else f"sqlite:///{output_root()}/mlflow.db"


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
    path = urllib.parse.unquote(uri[len("sqlite:///") :].split("?", 1)[0])
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
        raise TrackingError(
            f"tracking server {uri} answered {url} with HTTP {resp.status_code}; is tracking.uri an MLflow server?"
        )
