"""Triton RMSNorm kernel (+ optional fused residual add) and a torch launcher.

Semantics (same as :func:`llama_trt.plugins.rms_norm.op.rms_norm_reference`, Hugging Face
``LlamaRMSNorm`` order)::

    s  = x + residual                      (optional; rounded to x.dtype)
    xf = s.float()
    y  = (xf * rsqrt(mean(xf^2, -1) + eps)).to(x.dtype) * weight.to(x.dtype)

The sum of squares is accumulated in float32 whatever the IO dtype (fp16 ``x^2``
overflows for hidden sizes in the thousands, pytorch #133085). The weight product is
computed in float32 and rounded once to ``x.dtype`` -- which is exactly what torch's
elementwise fp16/bf16 multiply does, so the only differences from eager are the
order of the float32 reduction and ``rsqrt`` rounding (<= ~1 ulp of the output).

The kernel's argument order follows the TensorRT AOT plugin convention (tensor
inputs, then int32 scalars, then outputs) so that the very same ``@triton.jit``
function is compiled to PTX by :mod:`.trt_plugin`::

    X, [R], W, n_rows, n_cols, Y, [S]      (R and S only when HAS_RESIDUAL)

``import triton`` happens lazily (first launch), so this module imports without triton.
Kernels are built per interpreter mode (``TRITON_INTERPRET=1`` runs them on CPU tensors).
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

__all__ = ["RmsNormLaunchConfig", "get_rms_norm_kernel", "rms_norm_launch_config", "rms_norm_triton"]

# Widest row tile kept in registers in one pass; wider rows loop over column tiles
# (two passes over the row: sum of squares, then normalise; the re-read hits L2).
MAX_SINGLE_PASS_BLOCK_N = 16384
# Target number of elements per program when several short rows share a program.
_TILE_ELEMS = 2048


def _interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


class RmsNormLaunchConfig(NamedTuple):
    BLOCK_M: int      # rows per program
    BLOCK_N: int      # columns per tile (power of two)
    SINGLE_PASS: bool  # whole row fits in one tile
    num_warps: int

    def grid(self, n_rows: int) -> tuple:
        return ((n_rows + self.BLOCK_M - 1) // self.BLOCK_M,)


def rms_norm_launch_config(n_rows: int, n_cols: int, max_block_n: int = MAX_SINGLE_PASS_BLOCK_N) -> RmsNormLaunchConfig:
    """Tile sizes for a [n_rows, n_cols] problem (shared by the torch launcher and the AOT plugin).

    ``max_block_n`` (a power of two) caps the column tile; rows wider than it take the
    looped two-pass path (tests lower it to exercise that path on small tensors).
    """
    if n_cols < 1:
        raise ValueError(f"RMSNorm needs a hidden size >= 1, got {n_cols}")
    max_block_n = _next_pow2(max_block_n)
    block_n = min(_next_pow2(n_cols), max_block_n)
    single = block_n >= n_cols
    block_m = 1
    if single and block_n < _TILE_ELEMS:
        block_m = min(max(1, _TILE_ELEMS // block_n), _next_pow2(max(1, n_rows)), 64)
    tile = block_m * block_n
    num_warps = 4 if tile <= 2048 else 8 if tile <= 8192 else 16
    return RmsNormLaunchConfig(block_m, block_n, single, num_warps)


@functools.lru_cache(maxsize=None)
def _build_kernel(interpret: bool):
    # ``interpret`` is only a cache key: triton.jit decides between the compiled and the
    # interpreted function when the decorator runs, so each mode gets its own object.
    del interpret
    import triton
    import triton.language as tl

    @triton.jit
    def _rms_norm_kernel(
        X,
        R,
        W,
        n_rows,
        n_cols,
        Y,
        S,
        EPS: tl.constexpr,
        HAS_RESIDUAL: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        SINGLE_PASS: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < n_rows
        row_off = rows.to(tl.int64) * n_cols  # int64: no overflow past 2^31 elements
        cols = tl.arange(0, BLOCK_N)
        io_ty = X.dtype.element_ty

        if SINGLE_PASS:
            col_mask = cols < n_cols
            mask = row_mask[:, None] & col_mask[None, :]
            offs = row_off[:, None] + cols[None, :]
            x = tl.load(X + offs, mask=mask, other=0.0)
            if HAS_RESIDUAL:
                r = tl.load(R + offs, mask=mask, other=0.0)
                x = (x.to(tl.float32) + r.to(tl.float32)).to(io_ty)
                tl.store(S + offs, x, mask=mask)
            xf = x.to(tl.float32)
            mean_sq = tl.sum(xf * xf, axis=1) / n_cols
            rstd = tl.rsqrt(mean_sq + EPS)
            normed = (xf * rstd[:, None]).to(io_ty).to(tl.float32)
            w = tl.load(W + cols, mask=col_mask, other=0.0).to(io_ty).to(tl.float32)
            y = normed * w[None, :]
            tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for start in range(0, n_cols, BLOCK_N):
                c = start + cols
                mask = row_mask[:, None] & (c < n_cols)[None, :]
                offs = row_off[:, None] + c[None, :]
                x = tl.load(X + offs, mask=mask, other=0.0)
                if HAS_RESIDUAL:
                    r = tl.load(R + offs, mask=mask, other=0.0)
                    x = (x.to(tl.float32) + r.to(tl.float32)).to(io_ty)
                    tl.store(S + offs, x, mask=mask)
                xf = x.to(tl.float32)
                acc += xf * xf
            mean_sq = tl.sum(acc, axis=1) / n_cols
            rstd = tl.rsqrt(mean_sq + EPS)
            for start in range(0, n_cols, BLOCK_N):
                c = start + cols
                cmask = c < n_cols
                mask = row_mask[:, None] & cmask[None, :]
                offs = row_off[:, None] + c[None, :]
                x = tl.load(X + offs, mask=mask, other=0.0)
                if HAS_RESIDUAL:
                    # recompute s (not re-read S): no cross-thread ordering needed
                    r = tl.load(R + offs, mask=mask, other=0.0)
                    x = (x.to(tl.float32) + r.to(tl.float32)).to(io_ty)
                normed = (x.to(tl.float32) * rstd[:, None]).to(io_ty).to(tl.float32)
                w = tl.load(W + c, mask=cmask, other=0.0).to(io_ty).to(tl.float32)
                tl.store(Y + offs, (normed * w[None, :]).to(Y.dtype.element_ty), mask=mask)

    return _rms_norm_kernel


def get_rms_norm_kernel():
    """The ``@triton.jit`` RMSNorm kernel for the current ``TRITON_INTERPRET`` mode."""
    return _build_kernel(_interpret_mode())


def rms_norm_triton(x, weight, eps: float, residual=None, *, _max_block_n: int = MAX_SINGLE_PASS_BLOCK_N):
    """RMSNorm over the last dim of ``x`` with a Triton kernel.

    Args:
        x: ``[..., hidden]`` float32/float16/bfloat16 tensor (CUDA, or CPU under
            ``TRITON_INTERPRET=1``).
        weight: ``[hidden]`` (any float dtype; cast to ``x.dtype`` like the eager op).
        eps: epsilon added to the mean square.
        residual: optional tensor shaped and typed like ``x``; then ``s = x + residual``
            is normalised and ``(y, s)`` is returned.

    Returns:
        ``y`` (same shape/dtype as ``x``), or ``(y, s)`` when ``residual`` is given.
    """
    import torch

    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"rms_norm_triton: x must be float32/float16/bfloat16, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("rms_norm_triton: x must have at least one dimension (the hidden size)")
    n_cols = x.shape[-1]
    if weight.dim() != 1 or weight.shape[0] != n_cols:
        raise ValueError(f"rms_norm_triton: weight must be [{n_cols}], got {list(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"rms_norm_triton: weight must be a float tensor, got {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"rms_norm_triton: weight is on {weight.device}, x on {x.device}")
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
            raise ValueError(
                "rms_norm_triton: residual must match x in shape, dtype and device; got "
                f"{list(residual.shape)}/{residual.dtype}/{residual.device} vs "
                f"{list(x.shape)}/{x.dtype}/{x.device}"
            )

    x2 = x.reshape(-1, n_cols).contiguous()
    n_rows = x2.shape[0]
    y = torch.empty_like(x2)
    s = torch.empty_like(x2) if residual is not None else None
    if n_rows > 0 and n_cols > 0:
        r2 = residual.reshape(-1, n_cols).contiguous() if residual is not None else None
        cfg = rms_norm_launch_config(n_rows, n_cols, _max_block_n)
        kernel = get_rms_norm_kernel()
        kernel[cfg.grid(n_rows)](
            x2,
            r2,
            weight.contiguous(),
            n_rows,
            n_cols,
            y,
            s,
            EPS=float(eps),
            HAS_RESIDUAL=residual is not None,
            BLOCK_M=cfg.BLOCK_M,
            BLOCK_N=cfg.BLOCK_N,
            SINGLE_PASS=cfg.SINGLE_PASS,
            num_warps=cfg.num_warps,
        )
    y = y.reshape(x.shape)
    if residual is not None:
        return y, s.reshape(x.shape)
    return y
