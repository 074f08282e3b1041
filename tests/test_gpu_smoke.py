"""The GPU smoke's CPU mode, as the benchmarks give it (`bash scripts/gpu_smoke.sh cpu --out FILE`): jobs/distill.py
computing in bf16 with MLflow tracking on 2 gloo workers, one worker killed in stage C and the run resumed, and a
report that says so; and the script's splitting of big wheels into parts that travel separately and join back to
the same bytes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess

import pytest
from conftest import REPO

SCRIPT = REPO / "scripts" / "gpu_smoke.sh"


@pytest.fixture(scope="module")
def smoke(local_ray, tmp_path_factory):
    import ray

    work = tmp_path_factory.mktemp("smoke")
    out = work / "report.json"
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}  # the suite's own Ray, as a cluster's
    proc = subprocess.run(
        ["bash", str(SCRIPT), "cpu", "--out", str(out), "--work", str(work / "work")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return proc, (json.loads(out.read_text()) if out.is_file() else None), work / "work"


@pytest.mark.slow
@pytest.mark.timeout(1000)
def test_the_cpu_mode_runs_every_stage_kills_a_worker_and_resumes(smoke):
    proc, report, _ = smoke
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "error" not in report and report["mode"] == "cpu"
    assert set(report["stage_seconds"]) == {"teacher", "clustering", "student_and_test"}
    first, second = report["attempts"]
    assert first["ran"] == ["teacher", "clustering", "student"] and second["ran"] == ["student", "test"]
    assert second["resumed_at"]["stage"] == "student" == report["killed_worker_at"]["stage"]
    assert set(report["maps"]) == {f"test_query/{p}_map" for p in ("sshp", "ashp", "teacher")}
    assert all(0.0 <= v <= 1.0 for v in report["maps"].values())
    step = report["student_step"]
    assert step["bare_images_per_s"] > 0 and 0 < step["pipeline_over_bare"]
    assert any(line.startswith("a GPU") for line in report["could_not"])


@pytest.mark.slow
@pytest.mark.timeout(1000)
def test_the_cpu_mode_computes_in_bf16_tracks_both_attempts_and_caches_by_the_teachers_digest(smoke):
    from mlflow.tracking import MlflowClient

    _, _, work = smoke
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.data.params["train.precision"] == "bf16"
    # epoch metrics are queued for MLflow and flushed at each stage's end: the resumed attempt's two epochs are there
    assert [m.step for m in client.get_metric_history(run.info.run_id, "student/epoch_loss")][-2:] == [8, 12]
    assert list((work / "runs" / "teachers" / "cache").glob("k10-*.pt"))


def test_big_wheels_travel_in_parts_and_join_back_to_the_same_bytes(tmp_path):
    big = tmp_path / "big-1.0-py3-none-any.whl"
    big.write_bytes(os.urandom(61 << 20))  # over the 60 MiB a part holds
    small = tmp_path / "small-1.0-py3-none-any.whl"
    small.write_bytes(b"small")
    digest = hashlib.sha256(big.read_bytes()).hexdigest()
    subprocess.run(["bash", str(SCRIPT), "split", str(tmp_path)], check=True, capture_output=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "big-1.0-py3-none-any.whl.part-000",
        "big-1.0-py3-none-any.whl.part-001",
        "big-1.0-py3-none-any.whl.sha256",
        "small-1.0-py3-none-any.whl",
    ]
    subprocess.run(["bash", str(SCRIPT), "join", str(tmp_path)], check=True, capture_output=True)
    assert hashlib.sha256(big.read_bytes()).hexdigest() == digest

    part = tmp_path / "big-1.0-py3-none-any.whl.part-001"
    part.write_bytes(part.read_bytes()[:-1] + b"x")  # a part damaged on the way
    big.unlink()
    bad = subprocess.run(["bash", str(SCRIPT), "join", str(tmp_path)], capture_output=True, text=True)
    assert bad.returncode == 1 and "do not match" in bad.stderr
