"""MLflow edge (brcd_dist.tracking, brcd_dist.plots) against a real MLflow 3 sqlite store and registry in tmp_path.

Each test names its store explicitly (a copy of one initialised empty store: MLflow's migrations take seconds).
Logging a model takes seconds too, so it happens once per module (`logged_student`); the tests that read it do
not change what they read.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from conftest import sqlite_uri
from mlflow import MlflowClient
from mlflow.entities import ViewType
from PIL import Image

import brcd_dist
from brcd_dist import plots, tracking
from brcd_dist.config import Config, ModelConfig, TrackingConfig, flatten
from brcd_dist.models import HashModel, build_hash_model
from brcd_dist.tracking import TrackingError

REPO = Path(__file__).resolve().parents[1]


def make_config(uri: str, experiment: str = "test") -> Config:
    cfg = Config()
    cfg.tracking.uri = uri
    cfg.tracking.experiment = experiment
    return cfg


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def small_hash_model() -> HashModel:
    """A real HashModel with BatchNorm (so logging must export it in eval mode), small enough to export fast."""
    torch.manual_seed(0)
    return build_hash_model(ModelConfig(name="resnet10t"), bits=16, in_chans=1, img_size=32)


@pytest.fixture(autouse=True)
def _restore_tracking_uri():
    """start_run and log_hash_model make their URI the process's own: do not leak it into other tests."""
    yield
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def empty_store_file(tmp_path_factory) -> Path:
    """An initialised empty sqlite store: creating one runs MLflow's migrations (seconds), copying it does not."""
    directory = tmp_path_factory.mktemp("empty_store")
    MlflowClient(tracking_uri=sqlite_uri(directory)).search_experiments()
    return directory / "mlflow.db"


def copy_empty_store(directory: Path, empty_store_file: Path) -> str:
    shutil.copy(empty_store_file, directory / "mlflow.db")
    return sqlite_uri(directory)


@pytest.fixture
def uri(tmp_path, empty_store_file) -> str:
    """The URI of a fresh, empty sqlite store in tmp_path."""
    return copy_empty_store(tmp_path, empty_store_file)


@pytest.fixture(scope="module")
def logged_student(tmp_path_factory, empty_store_file):
    store = tmp_path_factory.mktemp("registry")
    uri = copy_empty_store(store, empty_store_file)
    model = small_hash_model().train()  # logged from train mode, as the pipeline would
    run_id = tracking.start_run(make_config(uri), run_name="student")
    t0 = time.perf_counter()
    model_uri = tracking.log_hash_model(run_id, model, "student", torch.randn(1, 1, 32, 32))
    log_s = time.perf_counter() - t0
    training_after_log = model.training
    version = tracking.register_model(model_uri, "brcd-student", "candidate", {"map_sshp": 0.61}, role="student")
    tracking.end_run(run_id)
    mlflow.set_tracking_uri(None)
    return dict(
        uri=uri,
        run_id=run_id,
        model=model,
        model_uri=model_uri,
        version=version,
        log_s=log_s,
        training_after_log=training_after_log,
    )


# ----------------------------------------------------------------------------- URIs and pre-flight checks


def test_empty_uri_resolves_to_sqlite_file_in_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert tracking.resolve_tracking_uri("") == f"sqlite:///{tmp_path}/mlflow.db"
    assert tracking.resolve_tracking_uri("http://mlflow:5000") == "http://mlflow:5000"


def test_unreachable_server_fails_fast_in_one_line_and_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the default sqlite store would appear if anything fell back to it
    cfg = TrackingConfig(uri=f"http://127.0.0.1:{closed_port()}")
    t0 = time.monotonic()
    with pytest.raises(TrackingError) as err:
        tracking.check_tracking(cfg)
    assert time.monotonic() - t0 < 5
    message = str(err.value)
    assert "\n" not in message and "unreachable" in message and cfg.uri in message
    assert list(tmp_path.iterdir()) == []  # no mlflow.db, no mlruns/


def test_silent_server_times_out_within_the_probe_timeout(tmp_path):
    """A port that accepts connections but never answers: one probe bounded by timeout_s, no retries."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        cfg = TrackingConfig(uri=f"http://127.0.0.1:{server.getsockname()[1]}")
        t0 = time.monotonic()
        with pytest.raises(TrackingError, match="unreachable"):
            tracking.check_tracking(cfg, timeout_s=0.5)
        assert time.monotonic() - t0 < 3


def test_fresh_sqlite_store_passes_without_creating_the_file(tmp_path):
    uri = sqlite_uri(tmp_path)
    assert tracking.check_tracking(TrackingConfig(uri=uri)) == uri
    assert not (tmp_path / "mlflow.db").exists()


def test_sqlite_store_in_missing_directory_is_refused(tmp_path):
    with pytest.raises(TrackingError, match="does not exist"):
        tracking.check_tracking(TrackingConfig(uri=sqlite_uri(tmp_path / "nowhere")))


def test_same_student_and_teacher_name_is_refused(tmp_path):
    cfg = TrackingConfig(uri=sqlite_uri(tmp_path), student_name="brcd", teacher_name="brcd")
    with pytest.raises(TrackingError, match="both 'brcd'"):
        tracking.check_tracking(cfg)


def test_registered_name_holding_the_other_role_is_refused_and_nothing_is_created(uri):
    client = MlflowClient(tracking_uri=uri)
    client.create_registered_model("brcd-teacher", tags={tracking.ROLE_TAG: "student"})
    experiments_before = [e.name for e in client.search_experiments(view_type=ViewType.ALL)]
    with pytest.raises(TrackingError) as err:
        tracking.check_tracking(TrackingConfig(uri=uri, experiment="new-experiment"))
    assert "\n" not in str(err.value) and "'brcd-teacher' holds student models" in str(err.value)
    assert [e.name for e in client.search_experiments(view_type=ViewType.ALL)] == experiments_before
    assert client.search_runs([e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]) == []


def test_registered_name_made_by_something_else_is_refused(uri):
    MlflowClient(tracking_uri=uri).create_registered_model("brcd-student")
    with pytest.raises(TrackingError, match="not made by brcd-dist"):
        tracking.check_tracking(TrackingConfig(uri=uri))


def test_registry_names_are_not_checked_when_registering_is_off(uri):
    MlflowClient(tracking_uri=uri).create_registered_model("brcd-student")
    assert tracking.check_tracking(TrackingConfig(uri=uri, register=False)) == uri


# ----------------------------------------------------------------------------- runs


def test_run_holds_config_params_tags_metrics_and_artifacts(tmp_path, uri):
    cfg = make_config(uri, experiment="distill")
    run_id = tracking.start_run(cfg, run_name="r1", manifest_digest="sha256:abc", tags={"stage": "student"})
    tracking.log_metrics(run_id, {"loss/total": 2.5, "loss/brcd": 1.5}, step=0)
    tracking.log_metrics(run_id, {"loss/total": 2.0, "loss/brcd": 1.0}, step=1)
    tracking.log_text(run_id, "brcd:\n  alpha: 0.8\n", "config.yaml")
    tracking.log_dict(run_id, {"sshp": 0.61}, "eval/map.json")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "state.txt").write_text("x")
    tracking.log_artifact(run_id, tmp_path / "ckpt", "checkpoints")
    tracking.end_run(run_id)

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "r1"
    assert client.get_experiment(run.info.experiment_id).name == "distill"
    assert run.data.params == {k: str(v) for k, v in flatten(cfg).items()}
    assert run.data.tags[tracking.MANIFEST_TAG] == "sha256:abc"
    assert run.data.tags["stage"] == "student"
    assert run.data.tags[tracking.GIT_TAG] == tracking.git_commit() != ""
    history = client.get_metric_history(run_id, "loss/total")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(0, 2.5), (1, 2.0)]
    files = {f.path for f in client.list_artifacts(run_id)} | {
        f.path for d in ("eval", "checkpoints") for f in client.list_artifacts(run_id, d)
    }
    assert {"config.yaml", "eval/map.json", "checkpoints/state.txt"} <= files
    assert json.loads(Path(client.download_artifacts(run_id, "eval/map.json", str(tmp_path))).read_text()) == {
        "sshp": 0.61
    }
    assert run.info.artifact_uri.startswith((tmp_path / "mlruns" / "distill").as_uri())  # beside the database


def test_param_longer_than_mlflow_limit_is_truncated(uri):
    cfg = make_config(uri)
    cfg.data.source_path = "/x" * 4000  # 8000 characters; MLflow refuses a param value over 6000
    run_id = tracking.start_run(cfg)
    value = MlflowClient(tracking_uri=uri).get_run(run_id).data.params["data.source_path"]
    assert len(value) == tracking.MAX_PARAM_VALUE and value.endswith("...")


def test_child_run_is_tagged_with_its_parent_and_shares_its_experiment(uri):
    parent = tracking.start_run(make_config(uri, experiment="sweep"), run_name="sweep")
    child = tracking.start_run(make_config(uri, experiment="elsewhere"), run_name="trial-0", parent_run_id=parent)
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(child).data.tags[tracking.PARENT_TAG] == parent
    assert client.get_run(child).info.experiment_id == client.get_run(parent).info.experiment_id


def test_another_process_logs_to_the_same_run(tmp_path, uri):
    """The driver opens the run; a worker process (as rank 0 would: queued, then flushed) logs to it by id while
    the driver logs too."""
    run_id = tracking.start_run(make_config(uri))
    worker = textwrap.dedent(f"""
        from brcd_dist import tracking
        for step in range(3):
            tracking.log_metrics({run_id!r}, {{"worker/loss": 1.0 / (step + 1)}}, step=step, synchronous=False,
                                 tracking_uri={uri!r})
        tracking.flush()
    """)
    proc = subprocess.Popen([sys.executable, "-c", worker], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    tracking.log_metrics(run_id, {"driver/epoch": 1.0}, step=0, tracking_uri=uri)
    assert proc.wait(timeout=120) == 0
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(run_id).data.metrics == {"worker/loss": pytest.approx(1.0 / 3), "driver/epoch": 1.0}
    assert sorted(m.step for m in client.get_metric_history(run_id, "worker/loss")) == [0, 1, 2]


def test_run_that_failed_before_training_is_marked_failed_and_deleted(uri):
    run_id = tracking.start_run(make_config(uri))
    assert tracking.fail_run(run_id, RuntimeError("no Ray cluster\nat 10.0.0.1"), tracking_uri=uri) == "deleted"
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and run.info.lifecycle_stage == "deleted"
    assert run.data.tags[tracking.ERROR_TAG] == "RuntimeError: no Ray cluster at 10.0.0.1"
    assert client.search_runs([run.info.experiment_id]) == []  # hidden from listings, still retrievable by id


def test_run_that_failed_during_training_is_kept_as_failed(uri):
    run_id = tracking.start_run(make_config(uri))
    tracking.log_metrics(run_id, {"loss/total": 3.0}, step=0, tracking_uri=uri)
    assert tracking.fail_run(run_id, "worker died", tracking_uri=uri) == "failed"
    run = MlflowClient(tracking_uri=uri).get_run(run_id)
    assert run.info.status == "FAILED" and run.info.lifecycle_stage == "active"


def test_interrupted_run_is_marked_killed(uri):
    run_id = tracking.start_run(make_config(uri))
    tracking.log_metrics(run_id, {"loss/total": 3.0}, step=0, tracking_uri=uri)
    assert tracking.fail_run(run_id, KeyboardInterrupt(), tracking_uri=uri) == "killed"
    assert MlflowClient(tracking_uri=uri).get_run(run_id).info.status == "KILLED"


def test_failing_run_fails_the_run_with_the_error_and_lets_the_error_go_on(uri):
    run_id = tracking.start_run(make_config(uri))
    tracking.log_metrics(run_id, {"loss/total": 3.0}, step=0, tracking_uri=uri)
    seen = []
    with pytest.raises(RuntimeError, match="worker died"):
        with tracking.failing_run(run_id, on_failure=seen.append):
            raise RuntimeError("worker died")
    run = MlflowClient(tracking_uri=uri).get_run(run_id)
    assert seen == [run_id]
    assert run.info.status == "FAILED" and run.data.tags[tracking.ERROR_TAG] == "RuntimeError: worker died"


def test_failing_run_leaves_a_run_that_succeeds_running(uri):
    run_id = tracking.start_run(make_config(uri))
    with tracking.failing_run(run_id, on_failure=lambda _: pytest.fail("called on success")):
        pass
    assert MlflowClient(tracking_uri=uri).get_run(run_id).info.status == "RUNNING"


def test_failing_run_without_a_run_only_lets_the_error_go_on():
    with pytest.raises(KeyError):
        with tracking.failing_run(None, on_failure=lambda _: pytest.fail("called without a run")):
            raise KeyError("x")


def test_end_run_rejects_an_unknown_status():
    with pytest.raises(ValueError, match="allowed: FINISHED, FAILED, KILLED"):
        tracking.end_run("any", status="DONE")


# ----------------------------------------------------------------------------- models and registry


def test_registered_model_loads_by_alias_in_a_fresh_process_with_the_same_outputs(logged_student, tmp_path):
    model = logged_student["model"].eval()
    x = torch.randn(5, 1, 32, 32, generator=torch.Generator().manual_seed(1))  # batch 5: example had batch 2
    with torch.no_grad():
        expected = model(x).numpy()
    np.save(tmp_path / "x.npy", x.numpy())
    script = textwrap.dedent("""
        import sys, numpy as np, torch
        from brcd_dist import tracking
        uri, x_path, out_path = sys.argv[1:]
        model = tracking.load_model("models:/brcd-student@candidate", tracking_uri=uri)
        with torch.no_grad():
            np.save(out_path, model(torch.from_numpy(np.load(x_path))).numpy())
    """)
    done = subprocess.run(
        [sys.executable, "-c", script, logged_student["uri"], str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, rtol=0, atol=1e-5)


def test_logged_model_is_found_by_its_run_uri(logged_student):
    """runs:/<run>/<name> only resolves if the model sits in its run's experiment (not MLflow's Default)."""
    model = logged_student["model"].eval()
    x = torch.randn(3, 1, 32, 32)
    loaded = tracking.load_model(
        f"runs:/{logged_student['run_id']}/student", exported=True, tracking_uri=logged_student["uri"]
    )
    with torch.no_grad():
        np.testing.assert_allclose(loaded(x).numpy(), model(x).numpy(), rtol=0, atol=1e-5)


def test_logging_exports_in_eval_mode_then_restores_training_mode(logged_student):
    """The fresh-process test shows the graph is eval-mode (BatchNorm running stats); here the caller's mode."""
    assert logged_student["training_after_log"] is True
    assert logged_student["log_s"] < 30, f"log_hash_model took {logged_student['log_s']:.1f} s"


def test_registered_version_has_alias_tags_and_role(logged_student):
    client = MlflowClient(tracking_uri=logged_student["uri"])
    version = client.get_model_version_by_alias("brcd-student", "candidate")
    assert str(version.version) == logged_student["version"] == "1"
    assert version.tags == {"map_sshp": "0.61", tracking.ROLE_TAG: "student"}
    assert client.get_registered_model("brcd-student").tags[tracking.ROLE_TAG] == "student"
    mlflow.set_tracking_uri(logged_student["uri"])  # download_artifacts ignores its tracking_uri for models:/ URIs
    model_dir = mlflow.artifacts.download_artifacts(logged_student["model_uri"])
    reqs = (Path(model_dir) / "requirements.txt").read_text().split()
    pinned = dict(r.split("==") for r in reqs)
    assert {"torch", "timm", "brcd-dist"} <= set(pinned)  # mlflow adds itself
    assert "+" not in pinned["torch"]  # '2.14.1', not the wheel's local label '2.14.1+cu130'
    assert pinned["brcd-dist"] == brcd_dist.__version__


def test_registering_again_moves_the_alias_to_the_new_version(logged_student):
    uri = logged_student["uri"]
    first = tracking.register_model(
        logged_student["model_uri"], "brcd-student-b", "best", {}, "student", tracking_uri=uri
    )
    second = tracking.register_model(
        logged_student["model_uri"], "brcd-student-b", "best", {}, "student", tracking_uri=uri
    )
    assert (first, second) == ("1", "2")
    assert str(MlflowClient(tracking_uri=uri).get_model_version_by_alias("brcd-student-b", "best").version) == "2"


def test_registering_a_teacher_under_a_student_name_is_refused(logged_student):
    uri = logged_student["uri"]
    with pytest.raises(TrackingError, match="holds student models"):
        tracking.register_model(
            logged_student["model_uri"], "brcd-student", "candidate", {}, "teacher", tracking_uri=uri
        )
    assert len(MlflowClient(tracking_uri=uri).search_model_versions("name = 'brcd-student'")) == 1


def test_hash_model_comes_back_as_a_hash_model_with_the_same_codes(logged_student):
    loaded = tracking.load_model("models:/brcd-student@candidate", tracking_uri=logged_student["uri"])
    x = torch.randn(4, 1, 32, 32)
    assert isinstance(loaded, HashModel) and loaded.bits == 16 and not loaded.training
    assert torch.equal(loaded.encode(x), logged_student["model"].eval().encode(x))


# ----------------------------------------------------------------------------- plots


def _png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def _expected_size(fig) -> tuple[int, int]:
    w, h = fig.get_size_inches() * fig.dpi
    return round(w), round(h)


def example_figures():
    rng = np.random.default_rng(0)
    agreement = rng.random((10, 64))
    recall = np.linspace(0, 1, 11)
    return {
        "loss": plots.loss_curves({"total": rng.random(50), "brcd": (np.arange(0, 100, 2), rng.random(50))}, smooth=5),
        "map": plots.map_curves(
            [1, 2, 3], {"sshp": [0.5, 0.6, 0.62], "ashp": [0.55, 0.63, 0.66], "teacher": 0.7}, topk=1000
        ),
        "pr": plots.pr_curves(
            {
                "sshp": (1 - 0.5 * recall, recall),
                "teacher": {"radius": np.arange(11), "precision": 1 - 0.3 * recall, "recall": recall},
            }
        ),
        "masks": plots.bit_agreement_heatmap(agreement, agreement >= 0.5, delta=0.5),
        "throughput": plots.throughput_bars({"teacher": 398.0, "student": 729.0}),
    }


@pytest.mark.parametrize("name", ["loss", "map", "pr", "masks", "throughput"])
def test_figure_renders_to_a_png_of_its_own_size(name, tmp_path):
    fig = example_figures()[name]
    path = plots.save_png(fig, tmp_path / "plots" / f"{name}.png")
    assert path.stat().st_size > 5000
    assert _png_size(path) == _expected_size(fig)


def test_heatmap_puts_a_dot_on_exactly_the_kept_bits():
    masks = np.zeros((3, 8))
    masks[0, [1, 5]] = 1
    masks[2, 7] = 1
    fig = plots.bit_agreement_heatmap(np.full((3, 8), 0.4), masks)
    dots = fig.axes[0].collections[0].get_offsets()
    assert sorted(map(tuple, np.asarray(dots).astype(int))) == [(1, 0), (5, 0), (7, 2)]  # (bit, cluster)


def test_figure_is_logged_as_a_run_artifact(uri):
    run_id = tracking.start_run(make_config(uri))
    tracking.log_figure(run_id, plots.throughput_bars({"teacher": 1.0, "student": 2.0}), "plots/throughput.png")
    assert [f.path for f in MlflowClient(tracking_uri=uri).list_artifacts(run_id, "plots")] == ["plots/throughput.png"]
