"""data/prefetch: batches prepared ahead in a thread come in order, an error in the thread reaches the consumer,
and a consumer that stops early stops the thread (on the CPU: the CUDA stream and events are the GPU's only part)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from brcd_dist.data.prefetch import prefetched


def test_batches_come_prepared_and_in_order():
    out = list(prefetched(range(20), lambda i: {"x": torch.tensor([i * 2])}, torch.device("cpu")))
    assert [int(b["x"]) for b in out] == [i * 2 for i in range(20)]


def test_preparation_runs_ahead_of_the_consumer_by_at_most_depth():
    prepared = []

    def prepare(i):
        prepared.append(i)
        return {"i": i}

    it = prefetched(range(10), prepare, torch.device("cpu"), depth=2)
    assert next(it)["i"] == 0
    time.sleep(0.5)  # the thread fills the queue while the consumer "trains"
    assert 2 <= len(prepared) <= 4  # the one taken, two queued, one waiting to be put
    assert [b["i"] for b in it] == list(range(1, 10))


def test_an_error_in_the_thread_is_raised_in_the_consumer_after_the_batches_before_it():
    def prepare(i):
        if i == 3:
            raise ValueError("bad batch 3")
        return {"i": i}

    seen = []
    with pytest.raises(ValueError, match="bad batch 3"):
        for b in prefetched(range(10), prepare, torch.device("cpu")):
            seen.append(b["i"])
    assert seen == [0, 1, 2]


def test_a_consumer_that_stops_early_stops_the_thread():
    it = prefetched(iter(range(10**9)), lambda i: {"i": i}, torch.device("cpu"))
    assert next(it)["i"] == 0
    it.close()
    assert not any(t.name == "batch-prefetch" and t.is_alive() for t in threading.enumerate())
