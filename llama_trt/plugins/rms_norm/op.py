"""RMSNorm as a torch custom op (Zhang & Sennrich 2019).

y = x / sqrt(mean(x^2, -1) + eps) * weight, statistics in float32, cast back to
the input dtype before the weight multiply (Hugging Face LlamaRMSNorm order).
"""

from __future__ import annotations

import torch

from ..spec import FusedOpSpec

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
