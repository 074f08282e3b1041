"""Which rank reads which shards in an epoch, and how many steps every rank takes, from the manifest alone.

Every rank computes the same plan from (per-shard counts, world size, epoch, seed), so all ranks agree on the
step count S = max over ranks of ceil(n_r / B) without communicating, and each rank cuts its own n_r samples
into exactly S non-empty batches of near-equal size. No rank runs out of batches while another still calls a
collective (a WebDataset split by node alone yields fewer batches on a rank with fewer shards).

Assignment: shards in a per-epoch seeded order go, one by one, to the rank with the fewest samples so far.
A shard is read by one rank in an epoch (DESIGN §5): at 64 ranks, reading every shard on every rank and keeping
one sample in 64 would read the split 64 times. A training plan (shuffle=True) that leaves a rank with less than
half the samples of the fullest (fewer shards than ranks, or a tiny last shard) is refused with the fix: make
near-equal shards, at least ranks x loader workers of them (data.shard_readers). An evaluation plan
(shuffle=False) takes any balance: ranks take different step counts there, and a rank may have nothing to read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ShardPart:
    """The `count` samples of shard `shard` (a rank reads whole shards)."""

    shard: int
    count: int


def plan_epoch(
    shard_counts: list[int], world_size: int, *, epoch: int = 0, seed: int = 0, shuffle: bool = True
) -> list[list[ShardPart]]:
    """Per rank, the shard parts it reads, in reading order. shuffle=False: manifest order, same every epoch."""
    if world_size < 1:
        raise ValueError(f"world_size={world_size}: must be >= 1")
    n = len(shard_counts)
    order = np.random.default_rng([seed, epoch, 0x5A4D]).permutation(n) if shuffle else np.arange(n)
    plan: list[list[ShardPart]] = [[] for _ in range(world_size)]
    loads = [0] * world_size
    for i in order:
        r = min(range(world_size), key=lambda q: (loads[q], q))
        plan[r].append(ShardPart(int(i), int(shard_counts[i])))
        loads[r] += int(shard_counts[i])
    if shuffle and 2 * min(loads) < max(loads):
        raise ValueError(
            f"{n} shards of {min(shard_counts, default=0)}-{max(shard_counts, default=0)} samples over "
            f"{world_size} ranks leave a rank {min(loads)} samples against {max(loads)}: re-make the "
            f"shards with data.shard_readers >= {world_size} x data.loader_workers (jobs/make_shards.py)"
        )
    return plan


def rank_count(parts: list[ShardPart]) -> int:
    return sum(p.count for p in parts)


def steps_per_epoch(plan: list[list[ShardPart]], batch_size: int, max_steps: int = 0) -> int:
    """S = max over ranks of ceil(n_r / B), capped by max_steps when > 0. The same on every rank."""
    steps = max((math.ceil(rank_count(parts) / batch_size) for parts in plan), default=0)
    return min(steps, max_steps) if max_steps > 0 else steps


def batch_sizes(n: int, steps: int, batch_size: int) -> list[int]:
    """min(n, steps*B) samples cut into `steps` near-equal batches (sizes differ by at most one, none above B)."""
    m = min(n, steps * batch_size)
    if steps and m < steps:
        raise ValueError(f"{n} samples cannot fill {steps} non-empty batches (more ranks than samples?)")
    q, rem = divmod(m, steps) if steps else (0, 0)
    return [q + 1] * rem + [q] * (steps - rem)
