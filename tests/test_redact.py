"""Credentials leave no trace: one redaction function for URL user-info, signed-URL query
tokens and secret-named variables, applied to MLflow params, the config.yaml artifact, the error tag, reader
warnings and Ray's runtime_env; credential variables reach the workers through the train loop's config."""

from __future__ import annotations

import pytest

from brcd_dist.redact import credential_env, redact, redact_env

SECRET = "S3CRET-TOKEN-1234"


@pytest.mark.parametrize(
    "text, expected",
    [
        (f"https://alice:{SECRET}@host/shards/{{shard}}", "https://***@host/shards/{shard}"),
        (f"https://{SECRET}@github.com/x", "https://***@github.com/x"),
        (
            f"s3://b/x.tar?X-Amz-Credential=AKIA&X-Amz-Signature={SECRET}&X-Amz-Security-Token={SECRET}",
            "s3://b/x.tar?X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Security-Token=***",
        ),
        (
            f"https://acct.blob.core.windows.net/c/x.tar?sv=2022&sig={SECRET}",
            "https://acct.blob.core.windows.net/c/x.tar?sv=2022&sig=***",
        ),
        (f"pipe:env API_TOKEN={SECRET} cat /x.tar", "pipe:env API_TOKEN=*** cat /x.tar"),
        (f"AWS_SECRET_ACCESS_KEY={SECRET}", "AWS_SECRET_ACCESS_KEY=***"),
    ],
)
def test_redact_masks_credentials(text, expected):
    assert redact(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "http://127.0.0.1:5000",
        "sqlite:////tmp/mlflow.db",
        "s3://bucket/runs",
        "models:/brcd-student@candidate",
        "runs:/abc123/student",
        "resnet18",
        "0.001",
    ],
)
def test_redact_leaves_ordinary_values(text):
    assert redact(text) == text


def test_redact_env_drops_secrets_and_strips_urls():
    env = {
        "MLFLOW_TRACKING_URI": f"http://u:{SECRET}@h:5000",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "MY_API_KEY": SECRET,
        "TORCH_EXTENSIONS_DIR": "/x",
    }
    assert redact_env(env) == {"MLFLOW_TRACKING_URI": "http://h:5000", "TORCH_EXTENSIONS_DIR": "/x"}


def test_credential_env_carries_driver_variables_and_tracking_userinfo():
    env = credential_env(
        {"AWS_ACCESS_KEY_ID": "AKIA", "AWS_SECRET_ACCESS_KEY": SECRET, "HOME": "/root"},
        tracking_uri=f"https://bob:{SECRET}%21@mlflow.example:443",
    )
    assert env == {
        "AWS_ACCESS_KEY_ID": "AKIA",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "MLFLOW_TRACKING_USERNAME": "bob",
        "MLFLOW_TRACKING_PASSWORD": SECRET + "!",
    }


def test_url_password_leaves_no_trace_in_the_mlflow_store(tmp_path, monkeypatch):
    from brcd_dist import tracking
    from brcd_dist.config import Config
    from brcd_dist.reporting import log_config

    monkeypatch.chdir(tmp_path)
    cfg = Config()
    cfg.data.shards_url = f"https://alice:{SECRET}@shards.example/fmnist/{{shard}}"
    cfg.student.uri = f"https://x.example/student.pt?X-Amz-Signature={SECRET}"
    cfg.tracking.uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = tracking.start_run(cfg, run_name="secret-test")
    log_config(run_id, cfg)
    tracking.log_metrics(run_id, {"x": 1.0}, 0)
    tracking.fail_run(run_id, RuntimeError(f"cannot read {cfg.data.shards_url}"))
    tracking.flush()
    client = tracking.client._client(cfg.tracking.uri)
    run = client.get_run(run_id)
    assert run.data.params["data.shards_url"] == "https://***@shards.example/fmnist/{shard}"
    assert "***" in run.data.tags[tracking.ERROR_TAG]
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in files) and any(p.name == "mlflow.db" for p in files)
    leaks = [str(p) for p in files if SECRET.encode() in p.read_bytes()]
    assert leaks == []
