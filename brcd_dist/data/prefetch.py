"""Batches prepared ahead in a background thread: on a GPU, the decode and augmentation of the next batches
(decoding.views_on_device) run on a side CUDA stream while the training step of this one runs on the default
stream, instead of one after the other in the training thread (DESIGN §5, "the data path feeds a GPU").

The order of the batches is kept, an error in the thread is raised in the consumer, and a consumer that stops early
(max_steps, an exception) stops the thread."""

from __future__ import annotations

import queue
import threading
from contextlib import nullcontext
from typing import Any, Callable, Iterable, Iterator

import torch

_END = object()


def prefetched(
    source: Iterable[Any], prepare: Callable[[Any], dict], device: torch.device, depth: int = 2
) -> Iterator[dict]:
    """`prepare(item)` for each item of `source`, up to `depth` batches ahead of the consumer, in order."""
    device = torch.device(device)
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                ready.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            with torch.cuda.stream(stream) if stream is not None else nullcontext():
                for item in source:
                    batch = prepare(item)
                    done = None
                    if stream is not None:
                        done = torch.cuda.Event()
                        done.record(stream)
                    if not put((batch, done)):
                        return
        except BaseException as err:  # noqa: BLE001 - raised in the consumer
            put((err, None))
            return
        put((_END, None))

    thread = threading.Thread(target=work, name="batch-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            batch, done = ready.get()
            if batch is _END:
                return
            if isinstance(batch, BaseException):
                raise batch
            if done is not None:  # the step's stream waits for the batch; the allocator keeps its memory till then
                current = torch.cuda.current_stream(device)
                current.wait_event(done)
                for value in batch.values():
                    if isinstance(value, torch.Tensor) and value.is_cuda:
                        value.record_stream(current)
            yield batch
    finally:
        stop.set()
        thread.join(timeout=60)
