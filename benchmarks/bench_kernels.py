#!/usr/bin/env python
"""Time the Triton RMSNorm and RoPE kernels against torch eager and torch.compile; print one JSON object.

For each shape, kernel and dtype: median milliseconds of the Triton kernel, of the same op
in eager torch and of that eager function under ``torch.compile``; achieved GB/s = bytes
the op must move (read + written once) / time; the fraction of the device's measured copy
bandwidth; the speed-ups over eager and over compiled torch.

Timing on CUDA: ``triton.testing.do_bench`` (warm-up, then repetitions with the L2 cache
flushed between them; median). Copy bandwidth: ``dst.copy_(src)`` on a warm, pre-allocated
1 GiB buffer pair (no first-touch costs), counted as bytes read + bytes written.

``--device cpu`` is a smoke mode (the kernels run in Triton's interpreter, TRITON_INTERPRET=1,
timed with perf_counter): it proves the script runs, its figures mean nothing.

Shapes are HIDDENxHEADSxHEAD_DIM: RMSNorm on [tokens, hidden] (plain and with the fused
residual add), RoPE on x [1, heads, tokens, head_dim] with rotary_dim = head_dim.

    python benchmarks/bench_kernels.py [--tokens 4096] [--shapes 576x9x64,4096x32x128]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def eager_rms_norm(x, w, eps, residual=None):
    import torch

    if residual is not None:
        x = x + residual
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w.to(x.dtype)
    return (y, x) if residual is not None else y


def eager_rope(x, position_ids, inv_freq, interleaved, rotary_dim):
    import torch

    ang = position_ids.float()[:, :, None] * inv_freq.float()[None, None, :]
    cos, sin = ang.cos().to(x.dtype)[:, None], ang.sin().to(x.dtype)[:, None]
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    if interleaved:
        a, b = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2)
    else:
        h = rotary_dim // 2
        a, b = rot[..., :h], rot[..., h:]
        out = torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)
    return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


class Timer:
    """Median milliseconds of a callable: do_bench on CUDA, perf_counter on CPU (smoke only)."""

    def __init__(self, device: str, warmup_ms: int, rep_ms: int) -> None:
        self.device, self.warmup_ms, self.rep_ms = device, warmup_ms, rep_ms

    def __call__(self, fn) -> float:
        if self.device == "cuda":
            from triton.testing import do_bench

            return float(do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="median"))
        fn()
        times, deadline = [], time.perf_counter() + self.rep_ms / 1e3
        while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 100):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def copy_bandwidth_gbs(timer: Timer, n_bytes: int) -> dict:
    import torch

    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=timer.device).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm: pages touched, kernels loaded
    if timer.device == "cuda":
        torch.cuda.synchronize()
    ms = timer(lambda: dst.copy_(src))
    moved = 2 * src.numel() * src.element_size()
    src = dst = None  # free them (the timed lambda closed over these names)
    if timer.device == "cuda":
        torch.cuda.empty_cache()
    return {"bytes_moved": moved, "median_ms": round(ms, 5), "gbs": round(moved / ms / 1e6, 1)}


def _max_diff(a, b) -> float:
    if isinstance(a, tuple):
        a, b = a[0], b[0]
    return float((a.float() - b.float()).abs().max().item())


def measure(name, dtype, bytes_moved, triton_fn, eager_fn, compiled_fn, timer, copy_gbs) -> dict:
    """One row: the three contenders on the same inputs (the closures hold them).

    ``compiled_fn`` None: not timed (``--no-compile``, or the time budget is spent)."""
    ms_triton, ms_eager = timer(triton_fn), timer(eager_fn)
    row = {
        "kernel": name, "dtype": str(dtype).replace("torch.", ""), "bytes_moved": bytes_moved,
        "triton_median_ms": round(ms_triton, 5), "eager_median_ms": round(ms_eager, 5),
        "compiled_median_ms": None,
        "triton_gbs": round(bytes_moved / ms_triton / 1e6, 1),
        "eager_gbs": round(bytes_moved / ms_eager / 1e6, 1),
        "fraction_of_copy_bw": round(bytes_moved / ms_triton / 1e6 / copy_gbs, 3),
        "speedup_vs_eager": round(ms_eager / ms_triton, 2),
        "speedup_vs_compiled": None,
        "max_abs_diff_vs_eager": _max_diff(triton_fn(), eager_fn()),
    }
    if compiled_fn is None:
        row["compiled_error"] = "not run (--no-compile or time budget spent)"
    else:
        try:
            compiled_fn()  # compile outside the timing
            ms_compiled = timer(compiled_fn)
            row["compiled_median_ms"] = round(ms_compiled, 5)
            row["speedup_vs_compiled"] = round(ms_compiled / ms_triton, 2)
        except Exception as e:  # noqa: BLE001 - a compiler failure is a result, not a crash
            row["compiled_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return row


def bench_shape(shape, tokens, dtype, timer, copy_gbs, compile_fn) -> list[dict]:
    import torch

    from llama_trt.plugins.rms_norm.kernel import rms_norm_triton
    from llama_trt.plugins.rope.kernel import rope_triton

    hidden, heads, head_dim = shape
    dev, eps, es = timer.device, 1e-5, torch.tensor([], dtype=dtype).element_size()
    c_rms = compile_fn(eager_rms_norm) if compile_fn and compile_fn.allowed() else None
    c_rope = compile_fn(eager_rope) if compile_fn and compile_fn.allowed() else None
    x = torch.randn(tokens, hidden, device=dev, dtype=dtype)
    r = torch.randn(tokens, hidden, device=dev, dtype=dtype)
    w = (1 + 0.1 * torch.randn(hidden, device=dev)).to(dtype)
    rows = [
        measure("rms_norm", dtype, (2 * tokens * hidden + hidden) * es,
                lambda: rms_norm_triton(x, w, eps), lambda: eager_rms_norm(x, w, eps),
                (lambda: c_rms(x, w, eps)) if c_rms else None, timer, copy_gbs),
        measure("rms_norm_residual", dtype, (4 * tokens * hidden + hidden) * es,
                lambda: rms_norm_triton(x, w, eps, residual=r), lambda: eager_rms_norm(x, w, eps, residual=r),
                (lambda: c_rms(x, w, eps, r)) if c_rms else None, timer, copy_gbs),
    ]
    x = r = w = None  # free them before the rope inputs (the lambdas above closed over these names)
    q = torch.randn(1, heads, tokens, head_dim, device=dev, dtype=dtype)
    pos = torch.arange(tokens, device=dev).unsqueeze(0)
    inv = 1.0 / (100000.0 ** (torch.arange(0, head_dim, 2, device=dev, dtype=torch.float32) / head_dim))
    for inter in (False, True):
        rows.append(measure(
            "rope_interleaved" if inter else "rope_half", dtype,
            2 * q.numel() * es + pos.numel() * 8 + inv.numel() * 4,
            lambda: rope_triton(q, pos, inv, inter, head_dim), lambda: eager_rope(q, pos, inv, inter, head_dim),
            (lambda: c_rope(q, pos, inv, inter, head_dim)) if c_rope else None, timer, copy_gbs))
    for row in rows:
        row["shape"] = {"tokens": tokens, "hidden": hidden, "heads": heads, "head_dim": head_dim}
    return rows


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    shapes = []
    for item in text.split(","):
        hidden, heads, head_dim = (int(v) for v in item.strip().lower().split("x"))
        shapes.append((hidden, heads, head_dim))
    return shapes


def _environment_problem(device: str) -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if device == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device available; this benchmark needs an NVIDIA GPU (or --device cpu for a smoke run)"
        if interpret:
            return "unset TRITON_INTERPRET (it would time the interpreter)"
    elif not interpret:
        if "triton" in sys.modules:
            return "--device cpu needs TRITON_INTERPRET=1 set before triton is imported"
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install triton)"
    return None


class Compiler:
    """``torch.compile(fn, dynamic=False)`` (a static kernel per shape: the best case for the
    compiler) while the time budget lasts; compiling dominates this benchmark's run time."""

    def __init__(self, budget_s: float) -> None:
        import torch._dynamo

        for name in ("cache_size_limit", "recompile_limit"):  # one entry per shape x dtype
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 256)
        self.deadline = time.perf_counter() + budget_s

    def allowed(self) -> bool:
        return time.perf_counter() < self.deadline

    def __call__(self, fn):
        import torch

        return torch.compile(fn, dynamic=False)


def run(args) -> dict:
    import torch
    import triton

    torch.manual_seed(0)
    timer = Timer(args.device, args.warmup_ms, args.rep_ms)
    copy = copy_bandwidth_gbs(timer, (1 << 30) if args.device == "cuda" else (16 << 20))
    compile_fn = Compiler(args.compile_budget_s) if args.compile else None
    results = []
    for shape in parse_shapes(args.shapes):
        for dname in args.dtypes.split(","):
            results += bench_shape(shape, args.tokens, getattr(torch, dname.strip()), timer, copy["gbs"], compile_fn)
    return {
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu (Triton interpreter, smoke)",
        "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
        "method": (f"triton.testing.do_bench median (warmup {args.warmup_ms} ms, rep {args.rep_ms} ms, L2 flushed "
                   "between reps)" if args.device == "cuda" else "perf_counter median (smoke: not a measurement)"),
        "tokens": args.tokens, "copy_bandwidth": copy, "torch_compile": bool(args.compile), "results": results,
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--shapes", default="4096x32x128", help="comma list of HIDDENxHEADSxHEAD_DIM")
    p.add_argument("--dtypes", default="float16,bfloat16")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--warmup-ms", type=int, default=100)
    p.add_argument("--rep-ms", type=int, default=1000)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the eager functions under torch.compile (default on)")
    p.add_argument("--compile-budget-s", type=float, default=1e9,
                   help="start no torch.compile after this many seconds (later rows: compiled not timed)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    problem = _environment_problem(args.device)
    if problem:
        print(f"bench_kernels: {problem}", file=sys.stderr)
        return 2
    print(json.dumps(run(args), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
