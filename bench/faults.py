"""Faults placed in a running distillation, for the fault test (tests/test_fault_resume.py) and the GPU smoke
(bench/gpu_smoke.py): a thread beside TorchTrainer.fit() that watches the run's registered checkpoints and kills
one train worker once a mid-epoch student checkpoint is there; it also notes when each stage's first checkpoint
was registered, which is the smoke's time per stage.

How the kill is placed: the thread polls the run's checkpoint_manager_snapshot.json (the checkpoints Ray Train has
registered, i.e. that every rank reported) until the latest one's state.json says stage "student" with
step_in_epoch > 0 (past every teacher step), then SIGKILLs one RayTrainWorker process. train.max_failures >= 1 lets
the controller restart the worker group, which gets that checkpoint from ray.train.get_checkpoint().
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import psutil

from brcd_dist import storage

KILL_DEADLINE_S = 600


def read_json(uri: str):
    """A JSON object that another process may be writing or replacing: None until it reads whole."""
    try:
        return json.loads(storage.read_bytes(uri))
    except (OSError, ValueError):
        return None


def latest_checkpoint(run_dir: str) -> tuple[str, dict] | None:
    """(directory name, state.json) of the run's latest checkpoint that Ray Train registered (every rank reported
    it), or None before the first or while a file is being written."""
    latest = (read_json(storage.join(run_dir, "checkpoint_manager_snapshot.json")) or {}).get(
        "latest_checkpoint_result"
    )
    state = read_json(storage.join(run_dir, latest["checkpoint_dir_name"], "state.json")) if latest else None
    return (latest["checkpoint_dir_name"], state) if state else None


def alive_train_worker_pids(address: str) -> list[int]:
    """The RayTrainWorker processes of the Ray at `address` (its dashboard's URL or its GCS address; state API)."""
    from ray.util.state import list_actors

    actors = list_actors(
        address=address,
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
        raise_on_missing_output=False,
    )
    return sorted(a.pid for a in actors)


def descendant_train_worker_pids(root: Optional[int] = None) -> list[int]:
    """The RayTrainWorker processes under this process (a Ray that ray.init started here: its raylet is a child)."""
    found = []
    for proc in psutil.Process(root or os.getpid()).children(recursive=True):
        try:
            if proc.name().startswith("ray::RayTrainWorker"):
                found.append(proc.pid)
        except psutil.Error:
            continue
    return sorted(found)


@dataclass
class MidStageCKiller:
    """Run beside fit() as `during(run_dir, finished)`: kill one train worker once a mid-epoch student checkpoint is
    registered (kill=False only watches). `stage_seen[stage]` is when a checkpoint of that stage was first seen
    (seconds after the thread started)."""

    find_pids: Callable[[], list[int]]
    kill: bool = True
    state_at_kill: Optional[dict] = None
    killed_pid: Optional[int] = None
    first_pids: list = field(default_factory=list)
    stage_seen: dict = field(default_factory=dict)
    error: Optional[BaseException] = None

    def __call__(self, run_dir: str, finished: threading.Event) -> None:
        try:
            self._run(run_dir, finished)
        except BaseException as err:  # noqa: BLE001 - reported by the caller
            self.error = err

    def _run(self, run_dir: str, finished: threading.Event) -> None:
        t0 = time.monotonic()
        deadline = t0 + KILL_DEADLINE_S
        while time.monotonic() < deadline and not finished.is_set():
            latest = latest_checkpoint(run_dir)
            if latest:
                if not self.first_pids:  # the workers are up (they reported); note them before stage C
                    self.first_pids = self.find_pids()
                state = latest[1]
                self.stage_seen.setdefault(state["stage"], time.monotonic() - t0)
                if self.kill and self.killed_pid is None and state["stage"] == "student":
                    if state["step_in_epoch"] > 0:
                        pid = self.first_pids[0]
                        assert psutil.Process(pid).name().startswith("ray::"), "not a Ray worker process"
                        os.kill(pid, signal.SIGKILL)
                        self.killed_pid, self.state_at_kill = pid, state
                if state["stage"] == "done":
                    return
            time.sleep(0.05)
        if self.kill and self.killed_pid is None:
            raise TimeoutError("the run ended, or ran past the deadline, before a mid-epoch student checkpoint")
