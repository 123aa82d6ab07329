"""The model's custom ops have a CUDA kernel of their own (the Triton launchers), so the torch
model on a GPU runs the fused kernels; CPU tensors keep the plain-torch reference.
(tests/plugins/test_kernels_gpu.py checks on a GPU that the CUDA kernel is the Triton one.)"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("name", ["rms_norm", "rope"])
def test_cuda_kernel_registered_cpu_left_to_the_reference(name):
    import llama_trt.plugins.rms_norm  # noqa: F401 - registers the ops
    import llama_trt.plugins.rope  # noqa: F401

    qualname = f"llama_trt::{name}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CUDA")
    assert not torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CPU")


def test_reference_runs_when_triton_is_missing(monkeypatch):
    """A CUDA box without triton still runs the model: the CUDA kernel falls back to the reference."""
    from llama_trt.plugins.rms_norm import op

    monkeypatch.setattr(op, "triton_usable", lambda: False)
    x, w = torch.randn(3, 8), torch.rand(8) + 0.5
    xf = x.double()
    ref = (xf / torch.sqrt((xf * xf).mean(-1, keepdim=True) + 1e-5)).float() * w  # numpy-free float64 reference
    torch.testing.assert_close(op._triton_impl(x, w, 1e-5), ref, rtol=1e-6, atol=1e-6)
