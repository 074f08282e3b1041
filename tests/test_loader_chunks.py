"""The CPU reading path's two costs that a bare decode-and-augment loop does not pay (the reader ratio):
batches cut across loader chunks (a copy of every view) and the heap refaulted every chunk (allocator.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from brcd_dist.data.reading import _chunk_plan

REPO = Path(__file__).resolve().parents[1]


def test_chunks_follow_the_planned_batches_so_no_batch_spans_two_chunks():
    assert _chunk_plan([58, 58, 57], 64) == [58, 58, 57]
    assert _chunk_plan([200, 199], 256) == [50, 50, 50, 50, 50, 50, 50, 49]
    assert _chunk_plan([5, 4], 5) == [5, 4]  # chunks of at least 8 only where a batch is that large


PROBE = """
import resource, sys, torch
from brcd_dist.data import tensor_augment
from brcd_dist.data.allocator import tune_for_augmentation
if sys.argv[1] == "tuned":
    assert tune_for_augmentation()
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
images = [torch.randint(0, 256, (3, 256, 320), dtype=torch.uint8, generator=g) for _ in range(64)]
keys = [str(i) for i in range(64)]
views = tensor_augment.TensorTwoViews(224, 3, 0, 0)
views(images, keys)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(2):
    views(images, keys)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    env = {"PYTHONPATH": str(REPO), "PATH": "/bin"}
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split()[-1])


def test_a_tuned_allocator_stops_refaulting_the_heap_every_chunk():
    untuned, tuned = _faults("default"), _faults("tuned")
    assert untuned > 20_000 and tuned < untuned / 2, (untuned, tuned)  # measured: 0-25% of untuned
