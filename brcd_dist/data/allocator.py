"""glibc malloc settings for the process that decodes and augments on the CPU (a loader worker, or the training
process itself with data.loader_workers=0).

Two views of a 64-image chunk at 224 px take float tensors of tens of MB each, made and freed every chunk. With
glibc's defaults the top of the heap is given back to the kernel whenever more than 2x the (dynamic) mmap
threshold is free, at most 64 MB, which is less than one chunk's working set, so the next chunk faults the same
pages in again: measured with bench/dataloader.py, up to 0.5 M minor page faults (1.5-2 s of system CPU) per
232-sample epoch in the reader, which holds a chunk while it cuts batches, against 0.05 M in a bare loop. Fixing
the mmap threshold at 128 MB (above a chunk's largest tensor; glibc's dynamic threshold stops at 32 MB on 64-bit)
and keeping up to 256 MB of free heap removes them for both (the process's resident size then stays at its peak
instead of shrinking between chunks).

Nothing is changed where the user set MALLOC_MMAP_THRESHOLD_ or MALLOC_TRIM_THRESHOLD_, or where the C library
has no mallopt (musl, macOS).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
MMAP_THRESHOLD = 128 << 20  # blocks above are mmapped (and faulted in afresh each time)
TRIM_THRESHOLD = 256 << 20  # free heap kept before giving memory back to the kernel

_tuned: bool | None = None  # once per process (a forked loader worker inherits the parent's settings)


def tune_for_augmentation() -> bool:
    """Apply the settings above to this process (once); True when they are in force."""
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return _tuned
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return _tuned
    # the mmap threshold first: setting either one turns glibc's dynamic threshold off
    _tuned = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return _tuned
