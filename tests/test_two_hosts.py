"""The multi-node recipe on two hosts that share nothing (cluster/two_hosts.sh): a Ray head and a worker node, each
in its own network, mount, UTS and PID namespaces, joined by a veth link; the object store (SeaweedFS) and MLflow
on the head; a client host that submits, and an outsider host on the same link without the token. Nothing here
runs on a disk, loopback or process table that two nodes share, so a run that depends on one fails.

One cluster, one object store and one reference run serve the module (module-scoped fixtures):
- the cluster guide's object-store recipe as a user types it on the client (make_shards to the bucket, then
  `ray job submit`; only the sizes made tiny, and STRICT_SPREAD so that one worker runs on each host): the result
  table, a worker on each host, the student registered in MLflow on the head and loadable from the client;
- the same job with the worker host killed (every process of it) in the middle of stage C, then booted again:
  the run resumes and its student equals the reference's, tensor for tensor (as tests/test_fault_resume.py
  compares a resumed run with an uninterrupted one, and for the same reasons);
- the same job with the link between the hosts down for a few seconds in the middle of a student epoch: the run
  finishes, without a restart, with the reference's student;
- the outsider tries the dashboard, the job API and the GCS port without the token: refused (the client, with
  the token, is answered: the same probes can fail).

Where these differ from a real cluster: one kernel and one CPU for all hosts; the hosts see the machine's root
filesystem (the repository and its virtualenv read-only, as an image; the data set's IDX files, which only the
client's make_shards reads); the cut is an `ip link set down` of the head's side of the link.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import torch
from conftest import REPO, tiny_overrides
from two_hosts import SCRIPT, Hosts

from brcd_dist.driver import Outputs, read_outputs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

_check = subprocess.run(["bash", str(SCRIPT), "check"], capture_output=True, text=True)
if _check.returncode != 0:
    pytest.skip((_check.stdout + _check.stderr).strip().splitlines()[-1], allow_module_level=True)

GUIDE = REPO / "docs" / "guides" / "cluster.md"
HELPER = str(REPO / "tests" / "two_hosts.py")  # run inside the hosts
HOSTS = ("head", "worker", "client", "outsider")
BUCKET = "brcd"
SHARDS_TINY = ["data.max_images=400", "data.train_per_class=8", "data.samples_per_shard=50"]
# the tiny run of tests/conftest.py (without its local paths and its tracking switch), restartable once
RUN_TINY = [
    *(
        o
        for o in tiny_overrides(Path("unused"), Path("unused"), "unused", max_failures=1)
        if not o.startswith(("data.shards_dir=", "train.storage_path=", "train.name=", "tracking.enabled="))
    ),
    "train.placement_strategy=STRICT_SPREAD",
]
CUT_SECONDS = 6
RELINK_S = 20  # the worker reaches the head again within this long after the link is up


def guide_recipe() -> tuple[list[str], list[str]]:
    """The cluster guide's object-store recipe, word for word: its make_shards line and its `ray job submit`, with
    BUCKET and HEAD named as the hosts name them (s3://brcd, http://head:8265)."""
    text = GUIDE.read_text().split("## The object-store recipe", 1)[1]
    block = re.search(r"```bash\n(.*?)```", text, re.DOTALL).group(1).replace("\\\n", " ")
    lines = [ln.split("  #", 1)[0].strip() for ln in block.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    make = next(shlex.split(ln) for ln in lines if ln.startswith("python jobs/make_shards.py"))
    submit = next(shlex.split(ln) for ln in lines if ln.startswith("ray job submit"))

    def named(words):
        return [w.replace("s3://BUCKET", f"s3://{BUCKET}").replace("http://HEAD:", "http://head:") for w in words]

    return named(make), named(submit)


MAKE_SHARDS, SUBMIT = guide_recipe()


def test_the_guide_recipe_is_what_this_module_runs():
    assert MAKE_SHARDS[:2] == ["python", "jobs/make_shards.py"]
    assert SUBMIT[: SUBMIT.index("--") + 3] == [
        "ray",
        "job",
        "submit",
        "--address",
        "http://head:8265",
        "--working-dir",
        ".",
        "--",
        "python",
        "jobs/distill.py",
    ]
    words = " ".join(SUBMIT)
    for key in ("data.shards_url=s3://brcd/", "train.storage_path=s3://brcd/runs ", "train.name="):
        assert key in words


def job_words(name: str | None = None) -> list[str]:
    """The guide's `ray job submit`, tiny, under run name `name` (default: the guide's)."""
    words = SUBMIT if name is None else [f"train.name={name}" if w.startswith("train.name=") else w for w in SUBMIT]
    return [*words, *RUN_TINY]


def run_name(words: list[str]) -> str:
    return next(w.split("=", 1)[1] for w in words if w.startswith("train.name="))


# ----------------------------------------------------------------------------- the cluster


@pytest.fixture(scope="module")
def hosts():
    """The two hosts, the client and the outsider, started for this module and stopped at its end, also when a
    test fails; then no namespace, link or process of theirs may be left."""
    state = Path(tempfile.mkdtemp(prefix="brcd-hosts-"))
    h = Hosts(state)
    try:
        h.script("start", "--cpus", "2", timeout=900)
        yield h
    finally:
        names = [h.namespace(x) for x in HOSTS] if (state / "id").is_file() else []
        pids = {x: h.pids(x) for x in HOSTS} if names else {}
        stopped = h.script("stop", timeout=180, check=False)
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        still = [p for ps in pids.values() for p in ps if psutil.pid_exists(p)]
        still = [p for p in still if psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        shutil.rmtree(state, ignore_errors=True)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert [n for n in names if n in left] == [] and still == [], (left, still)


def tail(log: str, n: int = 6000) -> str:
    """The end of a job's log without its progress bars."""
    bars = re.compile(r"\d+/s\]|\?\w+/s\]|^\s*$|\x1b\[A")
    return "\n".join(ln for ln in log.splitlines() if not bars.search(ln))[-n:]


def on(hosts: Hosts, host: str, *argv: str, timeout: float = 600) -> str:
    done = hosts.run(host, *argv, timeout=timeout)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done.stdout


def node_ids(hosts: Hosts) -> dict[str, str]:
    """Alive Ray nodes by IP, from the client (the state API, with the client's token)."""
    code = (
        "import json; from ray.util.state import list_nodes; "
        "print(json.dumps({n.node_ip: n.node_id for n in list_nodes(address='http://head:8265') "
        "if n.state == 'ALIVE'}))"
    )
    return json.loads(on(hosts, "client", "python", "-c", code).strip().splitlines()[-1])


def test_each_host_has_its_own_tmp_and_home_and_sees_the_repository_read_only(hosts):
    on(hosts, "head", "bash", "-c", "echo head >/tmp/only-here && echo head >~/only-here")
    for host in ("worker", "client", "outsider"):
        seen = on(hosts, host, "bash", "-c", "ls -A /tmp ~; hostname; touch .ro-check 2>&1 || true")
        assert "only-here" not in seen
    out = on(hosts, "client", "bash", "-c", "hostname; pwd; touch .ro-check 2>&1 || true")
    assert out.splitlines()[:2] == ["client", str(REPO)] and "Read-only file system" in out
    assert not (REPO / ".ro-check").exists()
    assert (hosts.disk("head") / "tmp" / "only-here").is_file()  # the head's /tmp is its own directory


def test_nothing_the_hosts_run_listens_in_the_machines_own_network(hosts):
    ours = {p for h in HOSTS for p in hosts.pids(h)}
    outside = subprocess.run(["ss", "-ltnupH"], capture_output=True, text=True, check=True).stdout
    listeners = {int(p) for p in re.findall(r"pid=(\d+)", outside)}
    assert ours and not (ours & listeners)
    inside = subprocess.run(
        ["ip", "netns", "exec", hosts.namespace("head"), "ss", "-ltnH"], capture_output=True, text=True, check=True
    ).stdout
    for port in (8265, 6379, 8333, 5000):  # Ray's dashboard and GCS, the object store, MLflow: on the head
        assert re.search(rf":{port}\b", inside), inside
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    assert "to-worker" not in links and "br0" not in links


# ----------------------------------------------------------------------------- without the token


def probe(hosts: Hosts, host: str) -> dict:
    return json.loads(on(hosts, host, "python", HELPER, "probe").strip().splitlines()[-1])


def test_the_outsider_without_the_token_is_refused_by_the_dashboard_the_job_api_and_the_gcs(hosts):
    got = probe(hosts, "outsider")
    assert got["token"] is False
    assert got["dashboard"] == 401 and got["job_list"] == 401 and got["job_submit"] in (401, 403), got
    assert got["gcs"] == "UNAUTHENTICATED", got
    submitted = hosts.run("outsider", "ray", "job", "submit", "--address", "http://head:8265", "--", "touch", "/tmp/X")
    out = submitted.stdout + submitted.stderr
    assert submitted.returncode != 0 and ("401" in out or "nauthorized" in out or "uthentica" in out), out[-3000:]
    time.sleep(1)
    assert not (hosts.disk("head") / "tmp" / "PWNED").exists() and not (hosts.disk("head") / "tmp" / "X").exists()


def test_the_client_with_the_token_is_answered_by_the_same_probes(hosts):
    got = probe(hosts, "client")
    assert got["token"] is True
    assert got["dashboard"] == 200 and got["job_list"] == 200, got
    assert got["gcs"] == "OK" and got["gcs_nodes"] >= 2, got


# ----------------------------------------------------------------------------- the guide's recipe


@dataclass
class Job:
    name: str
    returncode: int
    log: str
    outputs: Outputs
    events: list  # what the watcher saw and did, in order


@pytest.fixture(scope="module")
def shards(hosts):
    """The guide's make_shards line on the client, to the bucket on the head (tiny sizes)."""
    out = on(hosts, "client", *MAKE_SHARDS, *SHARDS_TINY)
    assert "test_query" in out
    return f"s3://{BUCKET}/fashion_mnist"


def fetch(hosts: Hosts, name: str) -> Outputs:
    """The run's final checkpoint, copied by the client from the bucket to its /tmp, read from the client's disk."""
    on(hosts, "client", "python", HELPER, "fetch", f"s3://{BUCKET}/runs/{name}", f"/tmp/out/{name}")
    return read_outputs(hosts.disk("client") / "tmp" / "out" / name)


def submit(hosts: Hosts, words: list[str], on_checkpoint=None) -> Job:
    """`ray job submit` on the client, to the end; `on_checkpoint(state)` is called (in a thread beside it) with
    each newly registered checkpoint's state and returns True once it has done its part."""
    name = run_name(words)
    events: list = []
    job = hosts.popen("client", *words)
    watcher = None
    if on_checkpoint is not None:
        watcher = hosts.popen("client", "python", HELPER, "watch", f"s3://{BUCKET}/runs/{name}")

        def follow():
            done = False
            for line in watcher.stdout:
                if not line.startswith("{"):
                    continue
                state = json.loads(line)
                events.append(("checkpoint", state))
                if not done:
                    done = bool(on_checkpoint(state, events))

        thread = threading.Thread(target=follow, daemon=True)
        thread.start()
    try:
        log, _ = job.communicate(timeout=1200)
    finally:
        if watcher is not None:
            try:
                watcher.wait(timeout=60)
            except subprocess.TimeoutExpired:
                watcher.kill()
            thread.join(timeout=30)
    outputs = fetch(hosts, name) if job.returncode == 0 else None
    return Job(name, job.returncode, log, outputs, events)


@pytest.fixture(scope="module")
def reference(hosts, shards) -> Job:
    """The guide's recipe, uninterrupted: the reference that the other runs are compared with."""
    return submit(hosts, job_words())


def test_the_guide_recipe_succeeds_and_prints_the_result_table(reference):
    assert reference.returncode == 0, tail(reference.log)
    assert re.search(r"Job '\w+' succeeded", reference.log)
    assert re.search(r"student \(SSHP\) +student +student +0\.\d{4}", reference.log), tail(reference.log, 3000)


def test_the_two_train_workers_ran_one_on_each_host(hosts, reference):
    logged = dict(re.findall(r"rank (\d) of 2: node ([0-9a-f]+), pid", reference.log))
    nodes = node_ids(hosts)
    assert sorted(logged) == ["0", "1"]
    assert {logged["0"], logged["1"]} == {nodes["10.213.7.1"], nodes["10.213.7.2"]}


def test_the_guide_recipe_registers_the_student_in_mlflow_on_the_head_and_the_client_loads_it(hosts, reference):
    run_id = re.search(r"mlflow +run (\w+)", reference.log).group(1)
    code = (
        "import json, torch\nfrom mlflow import MlflowClient\nfrom brcd_dist.tracking import load_model\n"
        "v = MlflowClient().get_model_version_by_alias('brcd-student', 'candidate')\n"
        "m = load_model('models:/brcd-student@candidate')\n"
        "print(json.dumps({'status': v.status, 'run_id': v.run_id, "
        "'weights': float(sum(p.double().sum() for p in m.state_dict().values() if p.is_floating_point()))}))"
    )
    got = json.loads(on(hosts, "client", "python", "-c", code).strip().splitlines()[-1])
    assert got["status"] == "READY" and got["run_id"] == run_id
    checkpoint = reference.outputs.student.state_dict()
    assert got["weights"] == pytest.approx(
        float(sum(p.double().sum() for p in checkpoint.values() if p.is_floating_point())), rel=1e-12
    )
    # the registry and the artifacts are on the head's disk, not on the worker's or the client's
    assert (hosts.disk("head") / "home" / "mlflow" / "mlflow.db").is_file()
    for host in ("worker", "client"):
        stray = [p for p in hosts.disk(host).rglob("*") if p.name in ("mlflow.db", "mlruns", "mlartifacts")]
        assert stray == [], stray


def test_the_guide_recipe_keeps_the_runs_checkpoints_on_the_bucket(reference):
    assert reference.outputs.state.stage == "done"
    assert reference.outputs.state.teacher_uri.startswith(f"s3://{BUCKET}/")
    attempts = reference.outputs.state.history["attempts"]
    assert len(attempts) == 1 and attempts[0]["resumed_at"] is None


# ----------------------------------------------------------------------------- the worker host killed


@pytest.fixture(scope="module")
def killed(hosts, reference) -> Job:
    """The recipe again, its worker host killed (every process) at the first mid-epoch student checkpoint, then
    booted again (same disk, empty /tmp) so that STRICT_SPREAD can place the restarted workers."""

    def kill_in_stage_c(state, events):
        if state["stage"] != "student" or not state["step_in_epoch"]:
            return False
        before = hosts.pids("worker")
        names = []
        for pid in before:
            try:
                names.append(psutil.Process(pid).name())
            except psutil.Error:
                pass
        hosts.script("kill", "worker")
        events.append(("killed", {"processes": len(before), "names": names, "left": hosts.pids("worker")}))
        hosts.script("boot", "worker", timeout=300)
        events.append(("booted", {}))
        return True

    return submit(hosts, job_words("killed"), kill_in_stage_c)


def test_the_worker_host_was_killed_whole_in_the_middle_of_stage_c(killed):
    kinds = [kind for kind, _ in killed.events]
    assert "killed" in kinds and "booted" in kinds, killed.events
    at = kinds.index("killed")
    state = killed.events[at - 1][1]
    assert state["stage"] == "student" and state["step_in_epoch"] > 0
    what = killed.events[at][1]
    assert any(n.startswith("ray::RayTrainWorker") for n in what["names"]), what  # a train worker was on it
    assert "raylet" in what["names"] and what["left"] == []


def test_after_the_worker_host_was_killed_the_run_resumes_stage_c_and_finishes(killed):
    assert killed.returncode == 0, tail(killed.log)
    state = killed.outputs.state
    assert state.stage == "done"
    first, second = state.history["attempts"]
    assert first["resumed_at"] is None and second["resumed_at"]["stage"] == "student"
    assert "teacher" not in second["ran"] and "clustering" not in second["ran"]


def test_the_resumed_run_has_the_reference_student(killed, reference):
    assert_same_student(killed.outputs, reference.outputs)


# ----------------------------------------------------------------------------- the link cut


@pytest.fixture(scope="module")
def cut(hosts, reference) -> Job:
    """The recipe again, the link between head and worker down for CUT_SECONDS at the first mid-epoch student
    checkpoint; the worker's reach of the head is tried before, during and after."""

    def reaches_head(seconds: int = 3) -> bool:
        probe = "exec 3<>/dev/tcp/head/8333"
        return hosts.run("worker", "timeout", str(seconds), "bash", "-c", probe, timeout=60).returncode == 0

    def cut_in_stage_c(state, events):
        if state["stage"] != "student" or not state["step_in_epoch"]:
            return False
        before = reaches_head()
        cutting = threading.Thread(target=hosts.script, args=("cut", str(CUT_SECONDS)), daemon=True)
        cutting.start()
        time.sleep(1)
        during = reaches_head()
        cutting.join(timeout=CUT_SECONDS + 30)
        t0 = time.monotonic()
        while not reaches_head() and time.monotonic() - t0 < RELINK_S:
            time.sleep(0.5)
        events.append(("cut", {"before": before, "during": during, "back_after_s": time.monotonic() - t0}))
        return True

    return submit(hosts, job_words("cut"), cut_in_stage_c)


def test_the_link_was_down_for_seconds_in_the_middle_of_a_student_epoch(cut):
    kinds = [kind for kind, _ in cut.events]
    assert "cut" in kinds, cut.events
    at = kinds.index("cut")
    assert cut.events[at - 1][1]["stage"] == "student" and cut.events[at - 1][1]["step_in_epoch"] > 0
    link = cut.events[at][1]
    assert link["before"] is True and link["during"] is False and link["back_after_s"] < RELINK_S, link


def test_the_run_with_the_cut_link_finishes_without_a_restart(cut):
    assert cut.returncode == 0, tail(cut.log)
    assert cut.outputs.state.stage == "done"
    assert len(cut.outputs.state.history["attempts"]) == 1


def test_the_run_with_the_cut_link_has_the_reference_student(cut, reference):
    assert_same_student(cut.outputs, reference.outputs)


def assert_same_student(got: Outputs, ref: Outputs) -> None:
    """What tests/test_fault_resume.py compares: every tensor of the student, and the test mAPs."""
    sa, sb = got.student.state_dict(), ref.student.state_dict()
    assert sa.keys() == sb.keys()
    differing = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not differing, f"{len(differing)} of {len(sa)} tensors differ, e.g. {differing[:3]}"
    for key in ("test_query/sshp_map", "test_query/ashp_map", "test_query/teacher_map"):
        assert got.test[key] == ref.test[key]
