"""Credentials out of everything this project writes down: MLflow params, tags and artifacts, logs, error lines
and Ray's runtime_env (which the dashboard shows). One function, `redact`, for text; `redact_env` for environment
variables handed to Ray; `credential_env` for the variables that workers need and that must travel without
being logged (they go to the workers inside the train loop's config, never through runtime_env)."""

from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Mapping
from typing import Any

MASK = "***"

# Environment variables that hold credentials and that the workers need as the driver has them.
CREDENTIAL_VARS = (
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_CLIENT_CERT_PATH",
    "MLFLOW_TRACKING_SERVER_CERT_PATH",
    "MLFLOW_TRACKING_INSECURE_TLS",
    "MLFLOW_S3_ENDPOINT_URL",
    "MLFLOW_S3_IGNORE_TLS",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_PROFILE",
    "AWS_CA_BUNDLE",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "GOOGLE_CLOUD_PROJECT",
    "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_STORAGE_ACCOUNT",
    "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
    "HF_TOKEN",
    "BRCD_HTTP_TOKEN",  # storage.HTTP_TOKEN_ENV: a bearer token for http(s) shards
)
# A variable or parameter whose name says it holds a secret.
_SECRET_NAME = (
    r"[A-Za-z0-9_.-]*(?:PASSWORD|PASSWD|SECRET|TOKEN|SIGNATURE|CREDENTIAL|API_?KEY|ACCESS_?KEY|"
    r"PRIVATE_?KEY|"
    r"CONNECTION_STRING|SAS_TOKEN|AUTHORIZATION)[A-Za-z0-9_.-]*"
)
SECRET_NAME = re.compile(rf"^{_SECRET_NAME}$", re.IGNORECASE)
# scheme://user:password@host or scheme://token@host: the whole user-info goes.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/\s@?#'\"]+)@")
# Signed-URL query tokens (S3 X-Amz-Signature/-Credential/-Security-Token, GCS X-Goog-*, Azure SAS sig, ?token=).
_QUERY_SECRET = re.compile(
    r"(?P<key>[?&](?:X-Amz-(?:Signature|Credential|Security-Token)"
    r"|X-Goog-(?:Signature|Credential)"
    r"|sig|signature|token|access_token|api_key|apikey|key|password|secret|Policy|Key-Pair-Id)=)"
    r"(?P<value>[^&#\s'\"]+)",
    re.IGNORECASE,
)
# NAME=value / NAME: value where NAME is a secret's name (env assignments in pipe: commands, messages).
_ASSIGNMENT = re.compile(rf"(?P<key>\b{_SECRET_NAME}\s*[=:]\s*)(?P<value>[^\s&'\",;]+)", re.IGNORECASE)


def redact(value: Any) -> Any:
    """`value` with every credential replaced by ***: URL user-info, signed-URL query tokens, and values of
    secret-named assignments. Strings, and strings inside dicts/lists/tuples; anything else as it is."""
    if isinstance(value, str):
        text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", value)
        text = _QUERY_SECRET.sub(lambda m: f"{m['key']}{MASK}", text)
        return _ASSIGNMENT.sub(lambda m: f"{m['key']}{MASK}", text)
    if isinstance(value, dict):
        return {k: (MASK if isinstance(k, str) and SECRET_NAME.match(k) and v else redact(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    return value


def strip_userinfo(url: str) -> str:
    """A URL without its user-info (for where the credentials travel separately, e.g. MLFLOW_TRACKING_USERNAME)."""
    return _USERINFO.sub(lambda m: m["scheme"], url)


def redact_env(env: Mapping[str, str]) -> dict[str, str]:
    """Environment variables fit to show (Ray's runtime_env, logs): secret-named ones dropped, credentials taken
    out of URLs. What the workers need of the dropped ones travels with `credential_env`."""
    out = {}
    for k, v in env.items():
        if k in CREDENTIAL_VARS or SECRET_NAME.match(k):
            continue
        out[k] = strip_userinfo(redact(v)) if isinstance(v, str) else v
    return out


def credential_env(environ: Mapping[str, str] | None = None, tracking_uri: str = "") -> dict[str, str]:
    """The driver's credential variables (CREDENTIAL_VARS) that are set, plus user:password from an http(s)
    tracking URI as MLFLOW_TRACKING_USERNAME/PASSWORD (runtime_env shows the URI without them): the workers apply
    them with `apply_credential_env`; they are never logged nor put in runtime_env."""
    environ = os.environ if environ is None else environ
    out = {k: environ[k] for k in CREDENTIAL_VARS if environ.get(k)}
    parts = urllib.parse.urlsplit(tracking_uri) if "://" in tracking_uri else None
    if parts is not None and parts.scheme in ("http", "https") and parts.username:
        out.setdefault("MLFLOW_TRACKING_USERNAME", urllib.parse.unquote(parts.username))
        if parts.password:
            out.setdefault("MLFLOW_TRACKING_PASSWORD", urllib.parse.unquote(parts.password))
    return out


def apply_credential_env(env: Mapping[str, str] | None) -> None:
    """In a worker: the driver's credentials, where the node does not set its own."""
    for k, v in (env or {}).items():
        if k in CREDENTIAL_VARS:
            os.environ.setdefault(k, v)
