"""Two hosts that share nothing (cluster/two_hosts.sh) for tests/test_two_hosts.py: a handle on the script, and the
small programs that the tests run inside the hosts, where the object store and the cluster are (the test process
itself, in the machine's own network namespace, reaches neither):

    python tests/two_hosts.py watch RUN_URI       # one JSON line per newly registered checkpoint of a run
    python tests/two_hosts.py fetch RUN_URI DEST  # the run's final checkpoint (and its teacher) copied to DEST
    python tests/two_hosts.py probe               # the dashboard, the job API and the GCS, with this host's token
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "cluster" / "two_hosts.sh"
DASHBOARD = "http://head:8265"
GCS = "head:6379"
WATCH_DEADLINE_S = 900


@dataclass
class Hosts:
    """The hosts of one `cluster/two_hosts.sh start`, its state (the hosts' disks) in `state`."""

    state: Path

    @property
    def env(self) -> dict:
        return {**os.environ, "BRCD_HOSTS_STATE": str(self.state)}

    def script(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(
            ["bash", str(SCRIPT), *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"two_hosts.sh {' '.join(args)}: exit {done.returncode}\n{done.stdout}{done.stderr}")
        return done

    def run(self, host: str, *argv: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """argv on `host` (its namespaces and environment; the client in the repository), to the end."""
        return self.script("exec", host, "--", *argv, timeout=timeout, check=False)

    def popen(self, host: str, *argv: str) -> subprocess.Popen:
        return subprocess.Popen(
            ["bash", str(SCRIPT), "exec", host, "--", *argv],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def namespace(self, host: str) -> str:
        return f"brcd-{(self.state / 'id').read_text().strip()}-{host}"

    def pids(self, host: str) -> list[int]:
        """Every process of `host` (those in its network namespace)."""
        out = subprocess.run(["ip", "netns", "pids", self.namespace(host)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def disk(self, host: str) -> Path:
        """The host's disk as seen from outside: home/ is its $HOME, tmp/ its /tmp."""
        return self.state / host


def watch(run_dir: str) -> None:
    """Print each newly registered checkpoint's stage and position (the run's Ray Train snapshot) until the run is
    done or the deadline passes."""
    from faults import latest_checkpoint

    seen = None
    deadline = time.monotonic() + WATCH_DEADLINE_S
    while time.monotonic() < deadline:
        latest = latest_checkpoint(run_dir)
        if latest and latest[0] != seen:
            seen, state = latest
            keys = ("stage", "epoch", "step_in_epoch", "global_step")
            print(json.dumps({"checkpoint": seen, **{k: state.get(k) for k in keys}}), flush=True)
            if state["stage"] == "done":
                return
        time.sleep(0.2)


def fetch(run_dir: str, dest: str) -> None:
    """The run's final checkpoint, and the teacher and clustering files it names, copied to the local directory
    `dest` (where driver.read_outputs finds them)."""
    import pyarrow.fs as pafs
    from faults import latest_checkpoint

    from brcd_dist import storage

    checkpoint = storage.join(run_dir, latest_checkpoint(run_dir)[0])
    Path(dest).mkdir(parents=True, exist_ok=True)
    pafs.copy_files(checkpoint, dest)
    state = json.loads((Path(dest) / "state.json").read_text())
    for key, name in (("teacher_uri", "teacher.pt"), ("clustering_uri", "clustering.pt")):  # kept once a run / round
        if state.get(key) and not (Path(dest) / name).is_file():
            (Path(dest) / name).write_bytes(storage.read_bytes(state[key]))
    print(json.dumps({"checkpoint": checkpoint, "files": sorted(os.listdir(dest))}))


def probe() -> None:
    """What this host gets from the cluster: HTTP statuses of the dashboard and the job API (a job that would touch
    /tmp/PWNED on the head), and the GCS's gRPC status for a node listing. Sends the host's token where it has one
    (~/.ray/auth_token, as Ray's clients do)."""
    import urllib.error
    import urllib.request

    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    token_file = Path.home() / ".ray" / "auth_token"
    token = token_file.read_text().strip() if token_file.is_file() else ""
    headers = {"Authorization": f"Bearer {token}"} if token else {}

    def http(method: str, path: str, body: dict | None = None) -> int:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(DASHBOARD + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=20) as resp:
                return resp.status
        except urllib.error.HTTPError as err:
            return err.code

    out = {
        "token": bool(token),
        "dashboard": http("GET", "/api/cluster_status"),
        "job_list": http("GET", "/api/jobs/"),
        "job_submit": http("POST", "/api/jobs/", {"entrypoint": "touch /tmp/PWNED"}),
    }
    with grpc.insecure_channel(GCS) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        metadata = [("authorization", f"Bearer {token}")] if token else []
        try:
            reply = stub.GetAllNodeInfo(gcs_service_pb2.GetAllNodeInfoRequest(), timeout=20, metadata=metadata)
            out["gcs"], out["gcs_nodes"] = "OK", len(reply.node_info_list)
        except grpc.RpcError as err:
            out["gcs"], out["gcs_nodes"] = err.code().name, None
    print(json.dumps(out))


if __name__ == "__main__":
    sys.path[:0] = [str(REPO), str(REPO / "bench")]  # brcd_dist, and bench/faults.py's checkpoint reader
    command, *args = sys.argv[1:]
    {"watch": watch, "fetch": fetch, "probe": probe}[command](*args)
