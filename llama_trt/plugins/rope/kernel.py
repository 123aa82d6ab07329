"""Triton rotary position embedding (RoPE) kernel and a torch launcher.

Semantics (same as :func:`llama_trt.plugins.rope.op.rope_reference`)::

    x            [batch, heads, seq, head_dim]   float32 / float16 / bfloat16, contiguous
    position_ids [batch, seq]                    int64 (a [1, seq] tensor is broadcast)
    inv_freq     [rotary_dim / 2]                float32 (any rope scaling already applied)

    angle[b, s, i] = float32(position_ids[b, s]) * inv_freq[i]      (float32)
    cos, sin       = cos(angle), sin(angle) in float32, then rounded to x.dtype

Only the first ``rotary_dim`` channels rotate; the rest are copied. Pairing "half"
(``interleaved=False``, Hugging Face ``rotate_half``): channel i pairs with i + rotary_dim/2;
"interleaved" (``interleaved=True``, Meta / llama2.c): channel 2i pairs with 2i+1.

Precision: positions go int64 -> float32 (exact below 2^24), the angle is one float32
product (as in HF's float32 matmul), cos/sin are Triton's accurate ``tl.cos``/``tl.sin``
(libdevice-style with full range reduction, not ``sin.approx``), rounded to x.dtype as HF
does. The rotation itself is done in float32 and rounded once to x.dtype, where eager
fp16/bf16 rounds after each product and after the sum: the kernel is at least as accurate
and differs from eager by <= ~1.5 ulp of the output dtype.

One program handles one token (b, s) and a block of heads: cos/sin are computed once per
token and reused across heads. The argument order follows the TensorRT AOT plugin
convention (inputs, int32 scalars, outputs)::

    X, POS, INV_FREQ, n_heads, seq_len, Y

``import triton`` is lazy (first launch), so this module imports without triton.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

__all__ = ["RopeLaunchConfig", "get_rope_kernel", "rope_launch_config", "rope_triton"]

# Target number of rotated pairs per program (heads x rotary_dim/2).
_TILE_PAIRS = 2048


def _interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


class RopeLaunchConfig(NamedTuple):
    BLOCK_H: int     # heads per program
    BLOCK_HALF: int  # >= rotary_dim / 2, power of two
    BLOCK_PASS: int  # >= head_dim - rotary_dim, power of two (0: nothing passes through)
    num_warps: int

    def grid(self, batch: int, n_heads: int, seq_len: int) -> tuple:
        return (batch * seq_len, (n_heads + self.BLOCK_H - 1) // self.BLOCK_H)


def rope_launch_config(n_heads: int, head_dim: int, rotary_dim: int) -> RopeLaunchConfig:
    """Tile sizes (shared by the torch launcher and the AOT plugin)."""
    check_rope_dims(head_dim, rotary_dim)
    half = rotary_dim // 2
    block_half = _next_pow2(half)
    n_pass = head_dim - rotary_dim
    block_pass = _next_pow2(n_pass) if n_pass > 0 else 0
    block_h = max(1, min(_next_pow2(max(1, n_heads)), _TILE_PAIRS // block_half))
    tile = block_h * block_half * 2
    num_warps = 2 if tile <= 512 else 4 if tile <= 4096 else 8
    return RopeLaunchConfig(block_h, block_half, block_pass, num_warps)


def check_rope_dims(head_dim: int, rotary_dim: int) -> None:
    if rotary_dim < 2 or rotary_dim % 2:
        raise ValueError(f"RoPE rotary_dim must be a positive even number, got {rotary_dim}")
    if rotary_dim > head_dim:
        raise ValueError(f"RoPE rotary_dim ({rotary_dim}) exceeds head_dim ({head_dim})")


@functools.lru_cache(maxsize=None)
def _build_kernel(interpret: bool):
    # ``interpret`` is only a cache key (triton.jit picks compiled vs interpreted at decoration).
    del interpret
    import triton
    import triton.language as tl

    @triton.jit
    def _rope_kernel(
        X,
        POS,
        INV_FREQ,
        n_heads,
        seq_len,
        Y,
        HEAD_DIM: tl.constexpr,
        ROT_DIM: tl.constexpr,
        INTERLEAVED: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_HALF: tl.constexpr,
        BLOCK_PASS: tl.constexpr,
    ):
        tok = tl.program_id(0)  # b * seq_len + s
        hblk = tl.program_id(1)
        b = tok // seq_len
        s = tok - b * seq_len
        io_ty = X.dtype.element_ty

        # angles in float32 from int64 positions; cos/sin rounded to the IO dtype (as HF)
        pos = tl.load(POS + tok.to(tl.int64)).to(tl.float32)
        i = tl.arange(0, BLOCK_HALF)
        imask = i < ROT_DIM // 2
        inv = tl.load(INV_FREQ + i, mask=imask, other=0.0)
        ang = pos * inv
        cos = tl.cos(ang).to(io_ty).to(tl.float32)
        sin = tl.sin(ang).to(io_ty).to(tl.float32)

        heads = hblk * BLOCK_H + tl.arange(0, BLOCK_H)
        hmask = heads < n_heads
        # [BLOCK_H] int64 offsets of x[b, h, s, 0]
        base = ((b.to(tl.int64) * n_heads + heads) * seq_len + s) * HEAD_DIM
        if INTERLEAVED:
            o1 = 2 * i
            o2 = 2 * i + 1
        else:
            o1 = i
            o2 = i + ROT_DIM // 2
        m = hmask[:, None] & imask[None, :]
        p1 = base[:, None] + o1[None, :]
        p2 = base[:, None] + o2[None, :]
        x1 = tl.load(X + p1, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(X + p2, mask=m, other=0.0).to(tl.float32)
        y1 = x1 * cos[None, :] - x2 * sin[None, :]
        y2 = x2 * cos[None, :] + x1 * sin[None, :]
        tl.store(Y + p1, y1.to(Y.dtype.element_ty), mask=m)
        tl.store(Y + p2, y2.to(Y.dtype.element_ty), mask=m)

        if BLOCK_PASS > 0:  # channels [ROT_DIM, HEAD_DIM) pass through unchanged
            c = ROT_DIM + tl.arange(0, BLOCK_PASS)
            pm = hmask[:, None] & (c < HEAD_DIM)[None, :]
            pp = base[:, None] + c[None, :]
            tl.store(Y + pp, tl.load(X + pp, mask=pm, other=0.0), mask=pm)

    return _rope_kernel


def get_rope_kernel():
    """The ``@triton.jit`` RoPE kernel for the current ``TRITON_INTERPRET`` mode."""
    return _build_kernel(_interpret_mode())


def rope_triton(x, position_ids, inv_freq, interleaved: bool, rotary_dim: int):
    """Apply RoPE to ``x`` [batch, heads, seq, head_dim] with a Triton kernel (out of place).

    ``position_ids`` is int64 [batch, seq] (or [1, seq], broadcast; other integer dtypes
    are converted), ``inv_freq`` float32 [rotary_dim/2]. Works on CUDA tensors, or on CPU
    tensors under ``TRITON_INTERPRET=1``.
    """
    import torch

    if x.dim() != 4:
        raise ValueError(f"rope_triton: x must be [batch, heads, seq, head_dim], got {list(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"rope_triton: x must be float32/float16/bfloat16, got {x.dtype}")
    batch, n_heads, seq_len, head_dim = x.shape
    rotary_dim = int(rotary_dim)
    check_rope_dims(head_dim, rotary_dim)
    if position_ids.dim() != 2 or position_ids.shape[1] != seq_len or position_ids.shape[0] not in (1, batch):
        raise ValueError(
            f"rope_triton: position_ids must be [{batch}, {seq_len}] (or [1, {seq_len}]), "
            f"got {list(position_ids.shape)}"
        )
    if position_ids.dtype.is_floating_point or position_ids.dtype == torch.bool:
        raise TypeError(f"rope_triton: position_ids must be an integer tensor, got {position_ids.dtype}")
    if inv_freq.numel() != rotary_dim // 2:
        raise ValueError(
            f"rope_triton: inv_freq must have rotary_dim/2 = {rotary_dim // 2} entries, got {inv_freq.numel()}"
        )
    for name, t in (("position_ids", position_ids), ("inv_freq", inv_freq)):
        if t.device != x.device:
            raise ValueError(f"rope_triton: {name} is on {t.device}, x on {x.device}")

    x = x.contiguous()
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    pos = position_ids.to(torch.int64).expand(batch, seq_len).contiguous()
    inv = inv_freq.reshape(-1).to(torch.float32).contiguous()
    cfg = rope_launch_config(n_heads, head_dim, rotary_dim)
    get_rope_kernel()[cfg.grid(batch, n_heads, seq_len)](
        x,
        pos,
        inv,
        n_heads,
        seq_len,
        out,
        HEAD_DIM=head_dim,
        ROT_DIM=rotary_dim,
        INTERLEAVED=bool(interleaved),
        BLOCK_H=cfg.BLOCK_H,
        BLOCK_HALF=cfg.BLOCK_HALF,
        BLOCK_PASS=cfg.BLOCK_PASS,
        num_warps=cfg.num_warps,
    )
    return out
