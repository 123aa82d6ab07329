"""runtime/sessions/malloc_trim.py: memory freed while a session opens goes back to the OS.

The mechanism, without ONNX Runtime: once a large mmapped block is freed, glibc raises its mmap
threshold to that size and its trim threshold to twice it, so the heap then keeps up to that much
freed memory resident (what happened to ORT's load-time weight copies). Run in a fresh
interpreter so the allocator starts from its defaults."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

_PROBE = r"""
import ctypes, json, sys
from llama_trt.runtime.sessions.malloc_trim import returning_freed_memory

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1])

def load():  # what an open does: a 16 MiB copy freed (thresholds now 16 and 32 MiB), then 24 of 1 MiB, all freed
    big = libc.malloc(16 << 20); ctypes.memset(big, 1, 16 << 20); libc.free(big)
    blocks = [libc.malloc(1 << 20) for _ in range(24)]
    for b in blocks:
        ctypes.memset(b, 1, 1 << 20)
    for b in reversed(blocks):
        libc.free(b)

before = rss()
if sys.argv[1] == "1":
    with returning_freed_memory():
        load()
else:
    load()
print(json.dumps({"kept_mib": (rss() - before) / 1024}))
"""


def _fresh(probe: str, trim: bool) -> dict:
    """``probe`` run in a fresh interpreter (the allocator at its defaults); its JSON line."""
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", probe, "1" if trim else "0"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def _kept(trim: bool) -> float:
    return _fresh(_PROBE, trim)["kept_mib"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator (Linux)")
def test_memory_freed_while_opening_is_returned():
    kept = _kept(False)
    assert kept > 20, kept  # glibc's default keeps the 24 MiB (else this test shows nothing)
    assert _kept(True) < 4, _kept(True)


def test_disabled_or_elsewhere_is_a_no_op():
    from llama_trt.runtime.sessions.malloc_trim import returning_freed_memory

    with returning_freed_memory(enabled=False):
        pass


_FAULTS = r"""
import ctypes, json, resource, sys
from llama_trt.runtime.sessions.malloc_trim import returning_freed_memory

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
with returning_freed_memory(enabled=sys.argv[1] == "1"):
    pass
def step():  # what a decode step does with its logits: a fresh 1 MiB buffer, written, freed
    p = libc.malloc(1 << 20); ctypes.memset(p, 1, 1 << 20); libc.free(p)
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    step()
print(json.dumps({"faults_per_step": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 50}))
"""


def _faults_per_step(trim: bool) -> float:
    return _fresh(_FAULTS, trim)["faults_per_step"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator (Linux)")
def test_per_step_buffers_are_reused_after_an_open():
    """After the open a buffer allocated anew every step is served from the heap, its pages
    already there: fixing a threshold turns glibc's dynamic ones off for good, and left at 128 KiB
    every 1 MiB block would be mmapped and fault in its 256 pages each step."""
    assert _faults_per_step(False) < 8  # glibc's own dynamic threshold already reuses it
    faults = _faults_per_step(True)
    assert faults < 8, faults
