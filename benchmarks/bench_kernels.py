#!/usr/bin/env python
"""Time the Triton RMSNorm and RoPE kernels against torch eager on a CUDA GPU; print one JSON object.

For each kernel and dtype (fp16, bf16): median milliseconds (``triton.testing.do_bench``:
warm-up, then many repetitions with the L2 cache flushed between them; median), achieved
GB/s = bytes the op must move (read + written once) / time, the fraction of the device's
measured copy bandwidth, and the speed-up over the eager torch version of the same op.

Copy bandwidth: ``dst.copy_(src)`` on a warm, pre-allocated 1 GiB buffer pair (no first-touch
costs), counted as bytes read + bytes written.

Sizes (defaults = Llama-7B/8B-like): RMSNorm on [tokens=4096, hidden=4096] (plain and with
the fused residual add); RoPE on x [1, 32 heads, 4096 tokens, 128] with rotary_dim 128.

    python benchmarks/bench_kernels.py [--tokens 4096] [--hidden 4096] [--heads 32] [--head-dim 128]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
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


def _bench(fn, warmup_ms: int = 100, rep_ms: int = 1000) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def copy_bandwidth_gbs(n_bytes: int = 1 << 30) -> dict:
    import torch

    src = torch.empty(n_bytes // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm: pages touched, kernels loaded
    torch.cuda.synchronize()
    ms = _bench(lambda: dst.copy_(src))
    moved = 2 * src.numel() * src.element_size()
    del src, dst
    torch.cuda.empty_cache()
    return {"bytes_moved": moved, "median_ms": ms, "gbs": moved / ms / 1e6}


def _entry(name, dtype, bytes_moved, ms_triton, ms_eager, copy_gbs, max_abs_diff):
    gbs = bytes_moved / ms_triton / 1e6
    return {
        "kernel": name,
        "dtype": str(dtype).replace("torch.", ""),
        "bytes_moved": bytes_moved,
        "triton_median_ms": round(ms_triton, 5),
        "eager_median_ms": round(ms_eager, 5),
        "triton_gbs": round(gbs, 1),
        "eager_gbs": round(bytes_moved / ms_eager / 1e6, 1),
        "fraction_of_copy_bw": round(gbs / copy_gbs, 3),
        "speedup_vs_eager": round(ms_eager / ms_triton, 2),
        "max_abs_diff_vs_eager": max_abs_diff,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--rotary-dim", type=int, default=None, help="default: head_dim")
    p.add_argument("--dtypes", default="float16,bfloat16")
    args = p.parse_args(argv)

    try:
        import torch
    except ImportError:
        print("bench_kernels: torch is not installed", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA device available; this benchmark needs an NVIDIA GPU", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("bench_kernels: unset TRITON_INTERPRET (it would time the interpreter)", file=sys.stderr)
        return 2
    try:
        import triton
    except ImportError:
        print("bench_kernels: triton is not installed (pip install triton)", file=sys.stderr)
        return 2

    from llama_trt.plugins.rms_norm.kernel import rms_norm_triton
    from llama_trt.plugins.rope.kernel import rope_triton

    torch.manual_seed(0)
    copy = copy_bandwidth_gbs()
    results = []
    T, Hd = args.tokens, args.hidden
    H, D = args.heads, args.head_dim
    R = args.rotary_dim or D
    eps = 1e-5
    for dname in args.dtypes.split(","):
        dtype = getattr(torch, dname.strip())
        es = torch.tensor([], dtype=dtype).element_size()

        # ---- RMSNorm: read x (+ weight once), write y
        x = torch.randn(T, Hd, device="cuda", dtype=dtype)
        w = (1 + 0.1 * torch.randn(Hd, device="cuda")).to(dtype)
        diff = (rms_norm_triton(x, w, eps).float() - eager_rms_norm(x, w, eps).float()).abs().max().item()
        results.append(_entry(
            "rms_norm", dtype, (2 * T * Hd + Hd) * es,
            _bench(lambda: rms_norm_triton(x, w, eps)), _bench(lambda: eager_rms_norm(x, w, eps)),
            copy["gbs"], diff))

        # ---- fused residual: read x, r (+ weight), write y, s
        r = torch.randn(T, Hd, device="cuda", dtype=dtype)
        y_t, _ = rms_norm_triton(x, w, eps, residual=r)
        y_e, _ = eager_rms_norm(x, w, eps, residual=r)
        diff = (y_t.float() - y_e.float()).abs().max().item()
        results.append(_entry(
            "rms_norm_residual", dtype, (4 * T * Hd + Hd) * es,
            _bench(lambda: rms_norm_triton(x, w, eps, residual=r)),
            _bench(lambda: eager_rms_norm(x, w, eps, residual=r)),
            copy["gbs"], diff))
        del x, w, r, y_t, y_e

        # ---- RoPE: read x, write y (+ positions int64 and inv_freq, small)
        q = torch.randn(1, H, T, D, device="cuda", dtype=dtype)
        pos = torch.arange(T, device="cuda").unsqueeze(0)
        inv = 1.0 / (500000.0 ** (torch.arange(0, R, 2, device="cuda", dtype=torch.float32) / R))
        for interleaved in (False, True):
            diff = (rope_triton(q, pos, inv, interleaved, R).float()
                    - eager_rope(q, pos, inv, interleaved, R).float()).abs().max().item()
            results.append(_entry(
                "rope_interleaved" if interleaved else "rope_half", dtype,
                2 * q.numel() * es + pos.numel() * 8 + inv.numel() * 4,
                _bench(lambda: rope_triton(q, pos, inv, interleaved, R)),
                _bench(lambda: eager_rope(q, pos, inv, interleaved, R)),
                copy["gbs"], diff))
        del q

    report = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "method": "triton.testing.do_bench median (warmup 100 ms, rep 1000 ms, L2 flushed between reps)",
        "sizes": {"tokens": T, "hidden": Hd, "heads": H, "head_dim": D, "rotary_dim": R},
        "copy_bandwidth": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in copy.items()},
        "results": results,
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
