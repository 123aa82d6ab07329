"""Freed memory goes back to the operating system while ONNX Runtime opens a session (glibc).

Opening a session, ONNX Runtime reads the graph, converts and prepacks the weights and frees
the intermediate copies. glibc keeps freed heap memory for reuse unless more than 128 KiB lies
free at the top of the heap, and its dynamic mmap threshold moves large blocks onto the heap
once one has been freed, so those copies stay resident: SmolLM2's peak RSS at open was 398 MiB
for int8-weight, 302 MiB for int4 and 853 MiB for fp16, and 318, 248 and 726 MiB with freed
memory returned (benchmarks/RESULTS.md). :func:`returning_freed_memory` sets glibc's trim
threshold to 0 for the duration of the open, then restores the default and trims once.

Process-wide effect, said plainly: setting the threshold turns glibc's dynamic mmap threshold
off for the rest of the process (blocks above 128 KiB are then always mmapped, as glibc does
before its first adjustment). Other C libraries and platforms: nothing is changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from contextlib import contextmanager
from typing import Iterator

M_TRIM_THRESHOLD = -1            # mallopt parameter numbers (malloc.h)
DEFAULT_TRIM_THRESHOLD = 128 * 1024


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
    ``malloc_trim(0)`` returns what is free elsewhere."""
    libc = _glibc() if enabled else None
    if libc is None:
        yield
        return
    libc.mallopt(M_TRIM_THRESHOLD, 0)
    try:
        yield
    finally:
        libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
        libc.malloc_trim(0)


__all__ = ["returning_freed_memory"]
