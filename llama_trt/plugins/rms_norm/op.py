"""RMSNorm as a torch custom op (Zhang & Sennrich 2019).

y = x / sqrt(mean(x^2, -1) + eps) * weight, statistics in float32, cast back to
the input dtype before the weight multiply (Hugging Face LlamaRMSNorm order).

CPU tensors run the plain-torch reference; CUDA tensors run the Triton kernel
(:mod:`.kernel`) when triton is importable, else the reference.
"""

from __future__ import annotations

import torch

from ..spec import FusedOpSpec, triton_usable

SPEC = FusedOpSpec(torch_name="rms_norm", op_type="RMSNorm", attributes={"epsilon": "float"})


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Plain-torch RMSNorm; the eager implementation of the custom op."""
    xf = x.to(torch.float32)
    variance = xf.pow(2).mean(-1, keepdim=True)
    y = (xf * torch.rsqrt(variance + epsilon)).to(x.dtype)
    return weight.to(x.dtype) * y


@torch.library.custom_op(SPEC.torch_qualname, mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, epsilon: float) -> torch.Tensor:
    return rms_norm_reference(x, weight, epsilon)


@rms_norm.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, epsilon: float) -> torch.Tensor:
    return torch.empty_like(x)


def _triton_impl(x: torch.Tensor, weight: torch.Tensor, epsilon: float) -> torch.Tensor:
    if not triton_usable():
        return rms_norm_reference(x, weight, epsilon)
    from .kernel import rms_norm_triton

    return rms_norm_triton(x, weight, epsilon)


def use_triton_kernel(device_type: str = "cuda") -> None:
    """Route the custom op to the Triton kernel for ``device_type`` ("cuda" is done at import;
    "cpu" runs the kernel in Triton's interpreter and needs ``TRITON_INTERPRET=1`` set before
    triton is first imported -- for smoke checks, not for speed)."""
    rms_norm.register_kernel(device_type)(_triton_impl)


use_triton_kernel("cuda")
