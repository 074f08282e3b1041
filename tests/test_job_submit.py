"""`ray job submit` of jobs/distill.py to the two-node local cluster of cluster/local_cluster.sh, the way a user
submits to a real cluster (DESIGN §1), started, entered and stopped by the cluster guide's commands; a job submitted
without the token is refused. Each node gets 2 logical CPUs, room for both workers (1 CPU each), so that the
spread comes from train.placement_strategy=STRICT_SPREAD, not from a lack of room (PACK would put both on one node).

The cluster gets its own state dir, Ray temp dir and free ports (the host is shared with other Ray instances), is
started by the module's fixture and stopped at its end, also when a test fails. The working dir is uploaded
(.gitignore respected: no .venv). Its worker node has its own Ray temp dir and directory.

One job runs on it: the cluster guide's object-store recipe as a user types it (only the sizes made tiny, and
STRICT_SPREAD), tracking on with its default store. It succeeds, prints the result table, its two train workers
ran on the two different nodes, its checkpoints are on the bucket (the teacher once beside them, the k-means cache
there too) and the student is registered in $BRCD_HOME/mlflow.db, where the guide says."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, VENV_BIN, free_port, tiny_overrides

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

WORKER_NODES = (
    "[w.node_id for w in list_actors(address=address, filters=[('class_name', '=', 'RayTrainWorker')], "
    "raise_on_missing_output=False)]"
)


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


CLUSTER_GUIDE = REPO / "docs" / "guides" / "cluster.md"


def readme_cluster_commands() -> list[str]:
    """The cluster guide's local two-node bash block, one command a line (continuations joined)."""
    text = CLUSTER_GUIDE.read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("## A local two-node cluster", 1)[1].split("```bash\n")[1:]]
    block = next(b for b in blocks if "cluster/local_cluster.sh start" in b)  # the local cluster's block
    lines = [ln.split("  #", 1)[0].rstrip() for ln in block.replace("\\\n", " ").splitlines()]
    return [
        " ".join(ln.split()) if not ln.startswith("eval") else ln
        for ln in lines
        if ln.strip() and not ln.lstrip().startswith("#")
    ]


README = readme_cluster_commands()
START, ENV, SUBMIT, STOP = README[0], README[1], README[2], README[3]
SUBMIT_PREFIX = SUBMIT.split(" -- ", 1)[0]


def test_readme_cluster_block_is_the_one_this_module_runs():
    assert START == "cluster/local_cluster.sh start"
    assert ENV == 'eval "$(cluster/local_cluster.sh env)"'
    assert SUBMIT_PREFIX == ".venv/bin/ray job submit --working-dir ."
    assert STOP == "cluster/local_cluster.sh stop" and len(README) == 4


def _bash(command: str, env: dict, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cluster(object_store):
    state_dir = tempfile.mkdtemp(prefix="brcd-cl-")  # short: Ray's socket paths under it must stay < 108 chars
    dash = free_port()
    # the nodes reach the session's object store by the standard AWS variables (os.environ, object_store fixture);
    # relative outputs and the default tracking store of a submitted job go under BRCD_HOME, not into the repo
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    env = {
        **base,
        "BRCD_CLUSTER_STATE": state_dir,
        "BRCD_HOME": str(Path(state_dir) / "home"),
        "RAY_PORT": str(free_port()),
        "RAY_DASHBOARD_PORT": str(dash),
        "RAY_AGENT_PORT_HEAD": str(free_port()),
        "RAY_AGENT_PORT_WORKER": str(free_port()),
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    try:
        started = _bash(f"{START} --cpus-head 2 --cpus-worker 2", env, 240)
        if started.returncode != 0:
            logs = "".join(p.read_text() for p in Path(state_dir).glob("*.log"))
            pytest.fail(f"local_cluster.sh start failed:\n{started.stdout}{started.stderr}{logs[-4000:]}")
        exported = _bash(f"{ENV} && env -0", env, 30).stdout  # the client shell's environment, as the README's
        client_env = dict(item.split("=", 1) for item in exported.split("\0") if "=" in item)
        assert client_env["RAY_AUTH_MODE"] == "token" and Path(client_env["RAY_AUTH_TOKEN_PATH"]).is_file()
        yield Cluster(address=f"http://127.0.0.1:{dash}", env=client_env)
    finally:
        _bash(STOP, env, 120)
        shutil.rmtree(state_dir, ignore_errors=True)


def ray_state(cluster: Cluster, expr: str):
    """A Ray state-API / job-client expression evaluated in a client process with the cluster's token (the test
    process itself holds no token, and may be attached to another, unauthenticated Ray)."""
    code = (
        "import json, sys\nfrom ray.util.state import list_actors, list_nodes\n"
        "from ray.job_submission import JobSubmissionClient\n"
        f"address = {cluster.address!r}\nprint(json.dumps({expr}))"
    )
    done = subprocess.run(
        [str(VENV_BIN / "python"), "-c", code], env=cluster.env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_job_submitted_without_the_token_is_refused(cluster, tmp_path):
    env = {k: v for k, v in cluster.env.items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    done = subprocess.run(
        [
            str(VENV_BIN / "ray"),
            "job",
            "submit",
            "--address",
            cluster.address,
            "--no-wait",
            "--",
            "touch",
            str(tmp_path / "PWNED"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = done.stdout + done.stderr
    assert done.returncode != 0, out[-3000:]
    assert "401" in out or "nauthorized" in out or "uthentication" in out, out[-3000:]
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{cluster.address}/api/jobs/", timeout=10)
    assert err.value.code == 401
    wrong = urllib.request.Request(f"{cluster.address}/api/jobs/", headers={"Authorization": "Bearer " + "0" * 64})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(wrong, timeout=10)
    assert err.value.code in (401, 403)
    assert not (tmp_path / "PWNED").exists()


def test_cluster_has_two_nodes_each_with_room_for_both_workers(cluster):
    alive = ray_state(
        cluster, "[n.resources_total['CPU'] for n in list_nodes(address=address, detail=True) if n.state == 'ALIVE']"
    )
    assert len(alive) == 2
    assert all(cpus >= 2 for cpus in alive)


def test_strict_spread_puts_the_two_train_workers_on_different_nodes(cluster, readme_job):
    nodes = set(ray_state(cluster, "[n.node_id for n in list_nodes(address=address)]"))
    workers = ray_state(cluster, WORKER_NODES)
    assert len(workers) == 2  # one worker group, never restarted (train.max_failures=0)
    assert set(workers) == nodes


def test_each_rank_logs_the_node_it_ran_on(cluster, readme_job):
    logged = dict(re.findall(r"rank (\d) of 2: node ([0-9a-f]+), pid", readme_job.log))
    assert sorted(logged) == ["0", "1"] and logged["0"] != logged["1"]
    assert set(logged.values()) == set(ray_state(cluster, WORKER_NODES))


# What Ray Train and DeepSpeed print at their default levels: -v only. Ray's C++ core still prints one
# ERROR line about Ray Train's PreemptionWatcher actor (RAY_BACKEND_LOG_LEVEL would trade it for one line a worker).
SET_UP_NOISE = (
    "Requesting resources",
    "Started training worker group",
    "TrainingReport(",
    "built successfully",
    "No CUDA runtime is found",
    "Setting accelerator to CPU",
)


def test_default_verbosity_keeps_ray_train_and_deepspeed_set_up_lines_out_of_the_job_log(readme_job):
    assert "rank 0 of 2: node" in readme_job.log  # the workers' output does reach this log
    assert [noise for noise in SET_UP_NOISE if noise in readme_job.log] == []


README_JOB = [
    "ray",
    "job",
    "submit",
    "--address",
    "ADDRESS",
    "--working-dir",
    ".",
    "--",
    "python",
    "jobs/distill.py",
    "--config",
    "configs/fashion_mnist.yaml",
    "data.source=shards",
    "data.shards_url=s3://BUCKET/fashion_mnist",
    "train.storage_path=s3://BUCKET/runs",
    "train.name=fmnist-1",
    "train.teacher_cache=s3://BUCKET/cache",
]


def _readme_command() -> list[str]:
    """The cluster guide's object-store `ray job submit`, word for word, as it reads now (a changed guide fails
    here)."""
    text = CLUSTER_GUIDE.read_text()
    block = re.search(r"ray job submit --address http://HEAD:8265 --working-dir \. -- \\\n(.*?)\n```", text, re.DOTALL)
    assert block, "docs/guides/cluster.md: the object-store recipe's `ray job submit` is gone"
    prefix = README_JOB[: README_JOB.index("--") + 1]  # what the pattern above matched: ray job submit ... --
    words = [*prefix, *block.group(1).replace("\\\n", " ").split()]
    assert words == README_JOB, words
    return words


@pytest.fixture(scope="module")
def readme_job(cluster, object_store, s3_shards, tiny_shards) -> Job:
    """The README's object-store recipe on the loopback bucket (BUCKET/fashion_mnist: the session's s3 shards),
    tracking on (default sqlite store), no local shards directory; only the tiny sizes appended, and
    train.placement_strategy=STRICT_SPREAD (the README's local-cluster job's), so that its two workers must run on
    the two nodes. The module's only job: every check of a submitted run reads this one."""
    submission_id = f"brcd-readme-{uuid.uuid4().hex[:8]}"
    words = [
        w.replace("ADDRESS", cluster.address)
        .replace("s3://BUCKET/fashion_mnist", s3_shards)
        .replace("s3://BUCKET", object_store.url().rstrip("/"))
        for w in _readme_command()
    ]
    words[0] = str(VENV_BIN / "ray")
    tiny = [
        o
        for o in tiny_overrides(tiny_shards, Path("unused"), "unused")
        if not o.startswith(("data.shards_dir=", "train.storage_path=", "train.name=", "tracking.enabled="))
    ]
    words[5:5] = ["--submission-id", submission_id]
    done = subprocess.run(
        [*words, *tiny, "train.placement_strategy=STRICT_SPREAD"],
        cwd=REPO,
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    return Job(submission_id, done.returncode, done.stdout + done.stderr, Path(cluster.env["BRCD_HOME"]))


def test_readme_object_store_recipe_succeeds_on_the_cluster(cluster, readme_job):
    status = ray_state(cluster, f"str(JobSubmissionClient(address).get_job_status({readme_job.submission_id!r}))")
    assert status == "SUCCEEDED", readme_job.log[-6000:]
    assert readme_job.returncode == 0
    assert re.search(r"student \(SSHP\) +student +student +0\.\d{4}", readme_job.log)  # the summary's table


def test_readme_recipe_leaves_checkpoints_on_the_bucket(object_store, readme_job):
    from brcd_dist import storage

    run_dir = object_store.url("runs", "fmnist-1")
    snapshot = json.loads(storage.read_bytes(storage.join(run_dir, "checkpoint_manager_snapshot.json")))
    latest = snapshot["latest_checkpoint_result"]
    assert latest["metrics"]["stage"] == "done"
    assert "student.pt" in storage.listdir(storage.join(run_dir, latest["checkpoint_dir_name"]))
    assert storage.is_file(storage.join(run_dir, "clustering-r0.pt"))  # once beside the checkpoints


def test_readme_recipe_keeps_the_teacher_once_on_the_bucket_by_its_key_not_in_the_checkpoints(object_store, readme_job):
    from brcd_dist import storage

    run_dir = object_store.url("runs", "fmnist-1")
    kept = [n for n in storage.listdir(object_store.url("runs", "teachers")) if n.endswith(".pt")]
    assert kept and "teacher.pt" not in storage.listdir(run_dir)
    checkpoints = [n for n in storage.listdir(run_dir) if n.startswith("checkpoint_")]
    assert checkpoints and all("teacher.pt" not in storage.listdir(storage.join(run_dir, c)) for c in checkpoints)


def test_readme_recipe_caches_the_kmeans_result_on_the_bucket(object_store, readme_job):
    from brcd_dist import storage

    assert any(n.endswith(".pt") for n in storage.listdir(object_store.url("cache")))


def test_readme_recipe_registers_the_student_in_brcd_home_mlflow_db(readme_job):
    from mlflow import MlflowClient

    db = readme_job.storage / "mlflow.db"  # the README: "$BRCD_HOME/mlflow.db" of the head node
    assert db.is_file(), readme_job.log[-3000:]
    version = MlflowClient(tracking_uri=f"sqlite:///{db}").get_model_version_by_alias("brcd-student", "candidate")
    assert version.status == "READY"
