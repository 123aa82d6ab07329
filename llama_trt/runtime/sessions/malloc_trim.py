"""Freed memory goes back to the operating system while ONNX Runtime opens a session (glibc).

Opening a session, ONNX Runtime reads the graph, converts and prepacks the weights and frees
the intermediate copies. glibc keeps freed heap memory for reuse unless more than 128 KiB lies
free at the top of the heap, and its dynamic mmap threshold moves large blocks onto the heap
once one has been freed, so those copies stay resident: SmolLM2's peak RSS at open was 398 MiB
for int8-weight, 302 MiB for int4 and 853 MiB for fp16, and 318, 248 and 726 MiB with freed
memory returned (benchmarks/RESULTS.md). :func:`returning_freed_memory` sets glibc's trim
threshold to 0 for the duration of the open, then fixes both thresholds and trims once.

Process-wide effect, said plainly: setting a threshold turns glibc's dynamic thresholds off for
the rest of the process, and glibc has no call that turns them on again. Left at 128 KiB, every
block above it is then mmapped and unmapped on free, so a buffer a decode step allocates anew
(the logits: batch x vocab x 4 bytes, 786 KiB for SmolLM2 at batch 4) faults its pages in on every
step: the kernel that first writes it paid for that (SmolLM2 int8-weight at batch 4: the head's
``ScatterElements`` 40-100 us -> 320-1660 us per step). So after the open the mmap threshold is
fixed at :data:`MMAP_THRESHOLD` (below glibc's own 32 MiB ceiling for its dynamic threshold) and
the trim threshold at twice it, as glibc's dynamic rule pairs them: blocks below it are reused
from the heap, and at most :data:`TRIM_THRESHOLD` of freed memory stays resident at its top. Other C libraries and
platforms: nothing is changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from contextlib import contextmanager
from typing import Iterator

M_TRIM_THRESHOLD = -1            # mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 16 << 20        # per-step buffers up to this come from the heap (8 x 128K vocab logits: 4 MiB)
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # glibc only (musl has no mallopt semantics to rely on)
        return libc
    except (OSError, AttributeError):
        return None


@contextmanager
def returning_freed_memory(enabled: bool = True) -> Iterator[None]:
    """Within the block, memory freed at the top of the heap is returned at once; after it, one
    ``malloc_trim(0)`` returns what is free elsewhere, and the thresholds are left at
    :data:`MMAP_THRESHOLD` / :data:`TRIM_THRESHOLD`."""
    libc = _glibc() if enabled else None
    if libc is None:
        yield
        return
    libc.mallopt(M_TRIM_THRESHOLD, 0)
    try:
        yield
    finally:
        libc.malloc_trim(0)
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)


__all__ = ["returning_freed_memory"]
