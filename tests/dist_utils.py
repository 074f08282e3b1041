"""Run a function on N real gloo ranks (spawned processes on 127.0.0.1) and collect what each rank returned or raised.

    outcomes = run_on_ranks(fn, 2, args=(data,))   # fn(rank, world_size, *args), importable at module level
    values = [o.unwrap() for o in outcomes]          # re-raises a rank's exception

A rank that raises does not stop the others; a run that does not finish within `timeout` seconds (a hang in a
collective) kills every rank and raises TimeoutError. Results and exceptions travel back pickled.
"""

from __future__ import annotations

import os
import pickle
import queue
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port


@dataclass
class RankOutcome:
    rank: int
    value: Any = None
    error: BaseException | None = None
    trace: str = ""

    def unwrap(self) -> Any:
        if self.error is not None:
            raise RuntimeError(f"rank {self.rank} failed:\n{self.trace}") from self.error
        return self.value


def _picklable(obj: Any) -> Any:
    try:
        pickle.dumps(obj)
        return obj
    except Exception:
        return RuntimeError(repr(obj))


def _worker(
    rank: int, world_size: int, port: int, fn: Callable, args: tuple, threads: int, timeout: float, results
) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout),
    )
    try:
        results.put((rank, _picklable(fn(rank, world_size, *args)), None, ""))
    except BaseException as e:  # report, do not die: the parent decides what an error means
        results.put((rank, None, _picklable(e), traceback.format_exc()))
    finally:
        dist.destroy_process_group()


def run_on_ranks(
    fn: Callable, world_size: int = 2, args: tuple = (), timeout: float = 120.0, threads_per_rank: int = 1
) -> list[RankOutcome]:
    """fn(rank, world_size, *args) on `world_size` gloo ranks; one RankOutcome per rank, in rank order."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker, args=(r, world_size, port, fn, args, threads_per_rank, timeout, results), daemon=True
        )
        for r in range(world_size)
    ]
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads_per_rank)  # read by OpenMP (torch, FAISS) when a child starts
    try:
        for p in procs:
            p.start()
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = saved
    outcomes: dict[int, RankOutcome] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outcomes) < world_size:
            try:
                rank, value, error, trace = results.get(timeout=1.0)
                outcomes[rank] = RankOutcome(rank, value, error, trace)
                continue
            except queue.Empty:
                pass
            missing = sorted(set(range(world_size)) - set(outcomes))
            dead = [r for r in missing if not procs[r].is_alive() and procs[r].exitcode not in (None, 0)]
            for r in dead:  # died without reporting (a crash in C code, a kill)
                outcomes[r] = RankOutcome(
                    r,
                    error=RuntimeError(f"exit code {procs[r].exitcode}"),
                    trace=f"rank {r} exited with code {procs[r].exitcode}",
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"run_on_ranks: ranks {missing} did not finish in {timeout:.0f} s")
        for p in procs:
            p.join(timeout=30)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    return [outcomes[r] for r in range(world_size)]
