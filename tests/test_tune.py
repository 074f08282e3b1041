"""A Ray Tune sweep of tiny trials finishes, reports each trial, registers the best as champion, and
its trials are child runs in MLflow. jobs/tune.py runs as the user runs it (a subprocess, its own cwd, a sqlite
store there) on the tiny run of conftest.py: 3 trials over K in {3, 4} and α, δ in [0, 1], one at a time.
Its storage is on the session's loopback S3 bucket: Tune's experiment, every trial's checkpoints, the
sweep's teacher and the k-means / teacher-codes cache all live under an s3:// train.storage_path.

The sweep attaches to the session's Ray instance (--address) instead of starting its own. Ray Train's
PlacementGroupCleaner, which frees the workers of a trial that ASHA stopped, finds its cluster by RAY_ADDRESS or
else by scanning the host for GCS processes, and fails where it sees several: the next trial then waits for CPUs
forever. jobs/tune.py hands a given --address to every Ray worker as RAY_ADDRESS; a sweep that started a second
instance beside the session's (or beside anyone else's on a shared machine) would have no address to hand on.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, tiny_overrides

from brcd_dist import storage as store

pytestmark = pytest.mark.slow

TUNE = REPO / "jobs" / "tune.py"
SAMPLES = 3
CLUSTERS = (3, 4)
NAME = "sweep"  # train.name: the sweep's run name, also its Tune experiment's
METRIC = "val_query/ashp_map"  # what ASHA ranks by and the champion is chosen by (--paradigm ashp, the default)
TEST_MAPS = ("test_query/sshp_map", "test_query/ashp_map")
TIMEOUT_S = 900
TRIAL_ROW = re.compile(r"^(\S+_\d{5})\s")  # a row of the printed trial table starts with the Tune trial id


def other_ray_instances(own_temp_dir: Path) -> list[str]:
    """GCS processes on this host that are not the session's (their command line names their own temp dir)."""
    out = subprocess.run(["pgrep", "-af", "gcs_server"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "gcs_server" in line and str(own_temp_dir) not in line]


@dataclass
class Sweep:
    cwd: Path
    storage: str  # train.storage_path: s3://...
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def uri(self) -> str:
        return f"sqlite:///{self.cwd}/mlflow.db"


def run_tune(args: list[str], cwd: Path, timeout_s: float, own_temp_dir: Path) -> tuple[int, str, str]:
    """jobs/tune.py in its own process group; on timeout the group is stopped and the test fails with the tail of
    what it printed."""
    out, err = cwd / "tune.stdout", cwd / "tune.stderr"
    # os.environ holds RAY_AUTH_MODE=token once the session's Ray is up: the sweep then sends the host's token
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with open(out, "w") as fo, open(err, "w") as fe:
        proc = subprocess.Popen(
            [sys.executable, str(TUNE), *args], cwd=cwd, env=env, stdout=fo, stderr=fe, start_new_session=True
        )
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            pytest.fail(
                f"jobs/tune.py ran past {timeout_s} s; other Ray instances on the host: "
                f"{len(other_ray_instances(own_temp_dir))}\n--- stdout tail ---\n"
                f"{out.read_text()[-4000:]}\n--- stderr tail ---\n{err.read_text()[-4000:]}"
            )
    return proc.returncode, out.read_text(), err.read_text()


@pytest.fixture(scope="module")
def sweep(local_ray, object_store, tiny_shards, tmp_path_factory) -> Sweep:
    import ray

    cwd = tmp_path_factory.mktemp("tune")
    storage = object_store.url("tune_runs")
    overrides = tiny_overrides(tiny_shards, storage, NAME) + [
        "train.checkpoint_every=100",  # only the epoch-end checkpoints
        "train.cpus_per_worker=0.5",  # a trial (0.01 CPU) and its 2 workers fit the session's 2 CPUs
        "tracking.enabled=true",
        f"tracking.uri=sqlite:///{cwd}/mlflow.db",
    ]
    args = [
        "--samples",
        str(SAMPLES),
        "--clusters",
        ",".join(map(str, CLUSTERS)),
        "--address",
        ray.get_runtime_context().gcs_address,
        *overrides,
    ]
    t0 = time.perf_counter()
    code, stdout, stderr = run_tune(args, cwd, TIMEOUT_S, local_ray.temp_dir)
    return Sweep(cwd, storage, code, stdout, stderr, seconds=time.perf_counter() - t0)


@pytest.fixture(scope="module")
def mlflow_runs(sweep):
    """(client, the sweep's parent run, its child runs, the rows of its trials.json)."""
    from mlflow import MlflowClient

    assert sweep.returncode == 0, sweep.stderr[-4000:]
    client = MlflowClient(tracking_uri=sweep.uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    parents = client.search_runs(experiments, "tags.`brcd.job` = 'tune'")
    assert len(parents) == 1
    parent = parents[0]
    children = client.search_runs(experiments, f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    rows = json.loads(
        Path(client.download_artifacts(parent.info.run_id, "trials.json", str(sweep.cwd / "download"))).read_text()
    )["trials"]
    return client, parent, children, rows


def best_validation_map(client, run) -> float:
    return max(m.value for m in client.get_metric_history(run.info.run_id, METRIC))


def test_sweep_exits_0_and_prints_one_row_per_trial(sweep):
    assert sweep.returncode == 0, sweep.stderr[-4000:]
    lines = sweep.stdout.splitlines()
    header = [i for i, line in enumerate(lines) if line.startswith("trial ") and f"best {METRIC}" in line]
    assert len(header) == 1, sweep.stdout[-4000:]
    rows = [TRIAL_ROW.match(line) for line in lines[header[0] + 2 : header[0] + 2 + SAMPLES]]
    assert all(rows), lines[header[0] : header[0] + 2 + SAMPLES]
    assert len({m.group(1) for m in rows}) == SAMPLES
    print(f"sweep of {SAMPLES} trials: {sweep.seconds:.0f} s")


def test_parent_run_is_finished_and_holds_the_trial_table(mlflow_runs):
    client, parent, _, rows = mlflow_runs
    assert parent.info.status == "FINISHED"
    assert {"trials.json", "trials.txt"} <= {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert len(rows) == SAMPLES and all(r["status"] in ("finished", "stopped (ASHA)") for r in rows)


def test_each_trial_is_a_child_run_with_its_test_map_and_student_or_killed_by_asha(mlflow_runs):
    client, _, children, rows = mlflow_runs
    status = {r["trial"]: r["status"] for r in rows}
    assert sorted(c.data.tags["brcd.trial"] for c in children) == sorted(status)
    assert "finished" in status.values()  # the first trial has no rival at any rung: ASHA never stops it
    for child in children:
        if status[child.data.tags["brcd.trial"]] == "stopped (ASHA)":
            assert child.info.status == "KILLED"
            assert child.data.tags["brcd.stopped_by"] == "ASHA" and "brcd.error" not in child.data.tags
            continue
        assert child.info.status == "FINISHED"
        for key in TEST_MAPS:
            assert 0.0 <= child.data.metrics[key] <= 1.0, key
        models = client.search_logged_models(
            [child.info.experiment_id], filter_string=f"source_run_id = '{child.info.run_id}'"
        )
        assert [m.name for m in models] == ["student"]


def test_champion_is_the_finished_trial_with_the_best_validation_ashp_map(mlflow_runs):
    client, _, children, _ = mlflow_runs
    finished = {c.info.run_id: best_validation_map(client, c) for c in children if c.info.status == "FINISHED"}
    champion = client.get_model_version_by_alias("brcd-student", "champion")
    assert champion.run_id in finished
    assert finished[champion.run_id] == max(finished.values())  # ties: any of the best will do


def cache_files(sweep: Sweep, prefix: str) -> dict[str, float]:
    """The sweep's cache objects whose names start with `prefix`: name -> when written (ms, whole seconds on S3:
    never later than the write)."""
    cache = store.join(sweep.storage, "teachers", "cache")
    return {n: store.modified(store.join(cache, n)) * 1000 for n in store.listdir(cache) if n.startswith(prefix)}


def test_kmeans_runs_once_per_distinct_k_and_later_trials_reuse_it(sweep, mlflow_runs):
    _, _, children, _ = mlflow_runs
    files = cache_files(sweep, "k")
    ks = {int(c.data.params["brcd.clusters"]) for c in children}
    assert sorted(int(re.match(r"k(\d+)-", name).group(1)) for name in files) == sorted(ks)
    for name, written in files.items():  # written by the first trial with its K, not rewritten by the later ones
        k = int(name.split("-")[0][1:])
        starts = sorted(c.info.start_time for c in children if int(c.data.params["brcd.clusters"]) == k)
        assert all(written < s for s in starts[1:]), (name, written, starts)


def test_teacher_codes_are_encoded_once_per_split_and_later_trials_reuse_them(sweep, mlflow_runs):
    _, _, children, _ = mlflow_runs
    files = cache_files(sweep, "packed-")
    splits = [name.split("-")[1] for name in files]
    assert "database" in splits and "val_query" in splits and len(splits) == len(set(splits)), splits
    starts = sorted(c.info.start_time for c in children)
    database = next(w for name, w in files.items() if name.startswith("packed-database-"))
    assert all(database < s for s in starts[1:])  # not rewritten by later trials


def test_teacher_is_trained_once_and_every_trial_uses_it(sweep, mlflow_runs):
    _, _, children, _ = mlflow_runs
    assert [n for n in store.listdir(sweep.storage) if n.endswith("-teacher")] == [f"{NAME}-teacher"]
    kept = [n for n in store.listdir(store.join(sweep.storage, "teachers")) if n.endswith(".pt")]
    assert len(kept) == 1  # kept under its content key (teacher_reuse), where a later run or sweep finds it
    teacher = store.join(sweep.storage, "teachers", kept[0])
    assert {c.data.params["teacher.uri"] for c in children} == {teacher}


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--clusters", "1,4", "error: brcd.clusters=1: "),
        ("--alpha", "0:2", "error: brcd.alpha=2.0: "),
    ],
)
def test_out_of_range_search_bound_fails_with_one_line_before_anything_starts(tmp_path, option, value, message):
    done = subprocess.run(
        [
            sys.executable,
            str(TUNE),
            option,
            value,
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
            f"train.storage_path={tmp_path}/runs",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), done.stderr
    assert list(tmp_path.iterdir()) == []  # no store, no run directory, no Ray session
