"""`ray job submit` of jobs/distill.py to the two-node local cluster of cluster/local_cluster.sh, the way a user
submits to a real cluster (DESIGN §1): the job succeeds, and with train.placement_strategy=STRICT_SPREAD its two
train workers ran on the two different nodes. Each node gets 2 logical CPUs, room for both workers (1 CPU each),
so that the spread comes from the strategy, not from a lack of room (PACK would put both on one node).

The cluster gets its own state dir, Ray temp dir and free ports (the host is shared with other Ray instances), is
started by the module's fixture and stopped at its end, also when a test fails. The working dir is uploaded
(.gitignore respected: no .venv); shards and storage are passed as absolute paths."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO, VENV_BIN, free_port, read_json, tiny_overrides

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SCRIPT = REPO / "cluster" / "local_cluster.sh"


@dataclass
class Cluster:
    address: str  # dashboard URL (job submission and state API)
    env: dict  # environment of the CLI calls


@dataclass
class Job:
    submission_id: str
    returncode: int
    log: str
    storage: Path


@pytest.fixture(scope="module")
def cluster():
    state_dir = tempfile.mkdtemp(prefix="brcd-cl-")  # short: Ray's socket paths under it must stay < 108 chars
    dash = free_port()
    env = {**os.environ, "BRCD_CLUSTER_STATE": state_dir, "RAY_AUTH_MODE": "disabled",
           "RAY_PORT": str(free_port()), "RAY_DASHBOARD_PORT": str(dash),
           "RAY_AGENT_PORT_HEAD": str(free_port()), "RAY_AGENT_PORT_WORKER": str(free_port()),
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    try:
        started = subprocess.run([str(SCRIPT), "start", "--cpus-head", "2", "--cpus-worker", "2"], env=env,
                                 capture_output=True, text=True, timeout=240)
        if started.returncode != 0:
            logs = "".join(p.read_text() for p in Path(state_dir).glob("*.log"))
            pytest.fail(f"local_cluster.sh start failed:\n{started.stdout}{started.stderr}{logs[-4000:]}")
        yield Cluster(address=f"http://127.0.0.1:{dash}", env=env)
    finally:
        subprocess.run([str(SCRIPT), "stop"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def job(cluster, tiny_shards, tmp_path_factory) -> Job:
    storage = tmp_path_factory.mktemp("job_runs")
    submission_id = f"brcd-test-{uuid.uuid4().hex[:8]}"
    cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", cluster.address, "--working-dir", ".",
           "--submission-id", submission_id, "--", "python", "jobs/distill.py",
           *tiny_overrides(tiny_shards, storage, "submitted"), "train.placement_strategy=STRICT_SPREAD"]
    done = subprocess.run(cmd, cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=600)
    return Job(submission_id, done.returncode, done.stdout + done.stderr, storage / "submitted")


def test_cluster_has_two_nodes_each_with_room_for_both_workers(cluster):
    from ray.util.state import list_nodes
    alive = [n for n in list_nodes(address=cluster.address, detail=True) if n.state == "ALIVE"]
    assert len(alive) == 2
    assert all(n.resources_total["CPU"] >= 2 for n in alive)


def test_submitted_job_succeeds(cluster, job):
    from ray.job_submission import JobStatus, JobSubmissionClient
    status = JobSubmissionClient(cluster.address).get_job_status(job.submission_id)
    assert status == JobStatus.SUCCEEDED, job.log[-6000:]
    assert job.returncode == 0


def test_job_prints_the_result_table_and_leaves_a_finished_checkpoint(job):
    assert "student SSHP (student → student)" in job.log
    snapshot = read_json(job.storage / "checkpoint_manager_snapshot.json")
    latest = snapshot["latest_checkpoint_result"]
    assert latest["metrics"]["stage"] == "done"
    files = {p.name for p in (job.storage / latest["checkpoint_dir_name"]).iterdir()}
    assert {"clustering.pt", "student.pt"} <= files and (job.storage / "teacher.pt").is_file()


def test_strict_spread_puts_the_two_train_workers_on_different_nodes(cluster, job):
    from ray.util.state import list_actors, list_nodes
    nodes = {n.node_id for n in list_nodes(address=cluster.address)}
    workers = list_actors(address=cluster.address, filters=[("class_name", "=", "RayTrainWorker")],
                          raise_on_missing_output=False)
    assert len(workers) == 2  # one worker group, never restarted (train.max_failures=0)
    assert {w.node_id for w in workers} == nodes


def test_each_rank_logs_the_node_it_ran_on(cluster, job):
    from ray.util.state import list_actors
    logged = dict(re.findall(r"rank (\d) of 2: node ([0-9a-f]+), pid", job.log))
    assert sorted(logged) == ["0", "1"] and logged["0"] != logged["1"]
    workers = list_actors(address=cluster.address, filters=[("class_name", "=", "RayTrainWorker")],
                          raise_on_missing_output=False)
    assert set(logged.values()) == {w.node_id for w in workers}
