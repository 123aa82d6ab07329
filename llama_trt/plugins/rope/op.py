"""Rotary position embedding as a torch custom op (Su et al., RoFormer 2021).

x: [batch, heads, seq, head_dim]; position_ids: int64 [batch, seq];
inv_freq: float32 [rotary_dim / 2] with any rope scaling already applied.
angle = float32(position) * inv_freq in float32; cos/sin are taken in float32 and
cast to x's dtype (as Hugging Face does). The first ``rotary_dim`` channels rotate:
``interleaved=False`` pairs (i, i + rotary_dim/2) (HF rotate_half),
``interleaved=True`` pairs (2i, 2i+1) (Meta, llama2.c). Real-valued throughout.

CPU tensors run the plain-torch reference; CUDA tensors run the Triton kernel
(:mod:`.kernel`) when triton is importable, else the reference.
"""

from __future__ import annotations

import torch

from ..spec import FusedOpSpec, triton_usable

SPEC = FusedOpSpec(
    torch_name="rope",
    op_type="RotaryEmbedding",
    attributes={"interleaved": "int", "rotary_dim": "int"},
)


def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos, sin of shape [batch, 1, seq, rotary_dim/2] in ``dtype``."""
    angles = position_ids.to(torch.float32).unsqueeze(-1) * inv_freq.to(torch.float32)
    return angles.cos().to(dtype).unsqueeze(1), angles.sin().to(dtype).unsqueeze(1)


def rope_reference(
    x: torch.Tensor,
    position_ids: torch.Tensor,
    inv_freq: torch.Tensor,
    interleaved: bool,
    rotary_dim: int,
) -> torch.Tensor:
    """Plain-torch RoPE; the eager implementation of the custom op."""
    cos, sin = rope_cos_sin(position_ids, inv_freq, x.dtype)
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    if interleaved:
        pairs = rot.unflatten(-1, (rotary_dim // 2, 2))
        a, b = pairs[..., 0], pairs[..., 1]
        out = torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2)
    else:
        half = rotary_dim // 2
        a, b = rot[..., :half], rot[..., half:]
        out = torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)
    return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


@torch.library.custom_op(SPEC.torch_qualname, mutates_args=())
def rope(
    x: torch.Tensor,
    position_ids: torch.Tensor,
    inv_freq: torch.Tensor,
    interleaved: bool,
    rotary_dim: int,
) -> torch.Tensor:
    return rope_reference(x, position_ids, inv_freq, interleaved, rotary_dim)


@rope.register_fake
def _(x, position_ids, inv_freq, interleaved, rotary_dim):
    return torch.empty_like(x)


def _triton_impl(x, position_ids, inv_freq, interleaved, rotary_dim):
    if not triton_usable():
        return rope_reference(x, position_ids, inv_freq, interleaved, rotary_dim)
    from .kernel import rope_triton

    return rope_triton(x, position_ids, inv_freq, interleaved, rotary_dim)


def use_triton_kernel(device_type: str = "cuda") -> None:
    """Route the custom op to the Triton kernel for ``device_type`` ("cuda" is done at import;
    "cpu" runs the kernel in Triton's interpreter and needs ``TRITON_INTERPRET=1`` set before
    triton is first imported -- for smoke checks, not for speed)."""
    rope.register_kernel(device_type)(_triton_impl)


use_triton_kernel("cuda")
