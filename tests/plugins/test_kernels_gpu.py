"""GPU parity of the Triton RMSNorm / RoPE kernels at realistic sizes (compiled, CUDA tensors).

Same semantics and tolerances as tests/plugins/test_kernels.py (which runs small sizes in
the Triton interpreter); here the references are float64 torch on the GPU, rounding to the
IO dtype where the eager ops round. Skipped without CUDA, or when TRITON_INTERPRET=1 is set
(interpreted kernels would run instead of compiled ones: run ``pytest -m gpu`` in a process
without it).
"""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.gpu

_EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
_ULPS = {torch.float32: 64, torch.float16: 2, torch.bfloat16: 2}
_ATOL = {torch.float32: 1e-6, torch.float16: 1e-5, torch.bfloat16: 1e-4}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module", autouse=True)
def _need_compiled_triton_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes"):
        pytest.skip("TRITON_INTERPRET=1 is set in this process; run the gpu tests in a separate pytest process")
    try:
        import triton  # noqa: F401
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"triton is not importable: {e!r}")


def _round(t, dtype):
    return t.to(dtype).to(torch.float64)


def _assert_close(got, ref, dtype, what, scale=None):
    err = (got.to(torch.float64) - ref).abs()
    bound = _ATOL[dtype] + _ULPS[dtype] * _EPS[dtype] * (ref.abs() if scale is None else scale)
    bad = err > bound
    assert not bad.any(), (f"{what} [{dtype}]: {int(bad.sum())}/{bad.numel()} out of tolerance, "
                           f"worst abs err {err.max().item():.3g}")


def ref_rms_norm(x64, w64, eps, dtype):
    ms = (x64 * x64).mean(-1, keepdim=True)
    normed = _round(x64 / torch.sqrt(ms + eps), dtype)
    return _round(normed * _round(w64, dtype), dtype)


def ref_rope(x64, pos, inv_freq, interleaved, rot, dtype):
    ang = pos.to(torch.float32)[:, :, None] * inv_freq.to(torch.float32)[None, None, :]
    cos = _round(torch.cos(ang.to(torch.float64)), dtype)[:, None]
    sin = _round(torch.sin(ang.to(torch.float64)), dtype)[:, None]
    out, scale = x64.clone(), x64.abs()
    if interleaved:
        i1, i2 = slice(0, rot, 2), slice(1, rot, 2)
    else:
        i1, i2 = slice(0, rot // 2), slice(rot // 2, rot)
    a, b = x64[..., i1], x64[..., i2]
    out[..., i1], out[..., i2] = a * cos - b * sin, b * cos + a * sin
    scale[..., i1], scale[..., i2] = (a * cos).abs() + (b * sin).abs(), (b * cos).abs() + (a * sin).abs()
    return _round(out, dtype), scale


# hidden 576 (SmolLM2-135M) .. 8192 (Llama-70B), up to 8192 tokens; odd sizes hit the masks
RMS_SHAPES = [(8192, 576), (1, 576), (16, 2048), (4096, 4096), (1, 4096), (333, 1000), (4096, 67), (64, 8192),
              (8, 32768)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("shape", RMS_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_rms_norm_gpu_parity(shape, residual, dtype):
    from llama_trt.plugins.rms_norm.kernel import rms_norm_triton

    g = torch.Generator(device="cuda").manual_seed(0)
    x = (2 * torch.randn(shape, generator=g, device="cuda")).to(dtype)
    w = (1 + 0.5 * torch.randn(shape[-1], generator=g, device="cuda")).to(dtype)
    if residual:
        r = (3 * torch.randn(shape, generator=g, device="cuda")).to(dtype)
        y, s = rms_norm_triton(x, w, 1e-5, residual=r)
        s_ref = _round(x.double() + r.double(), dtype)
        assert torch.equal(s.double(), s_ref), "fused residual sum must be exact"
        y_ref = ref_rms_norm(s_ref, w.double(), 1e-5, dtype)
    else:
        y = rms_norm_triton(x, w, 1e-5)
        y_ref = ref_rms_norm(x.double(), w.double(), 1e-5, dtype)
    assert y.dtype == dtype and y.shape == x.shape
    _assert_close(y, y_ref, dtype, f"RMSNorm {shape}")


ROPE_SHAPES = [
    (1, 32, 8192, 128, 128),   # Llama prefill, 8k tokens
    (1, 9, 8192, 64, 64),      # SmolLM2-135M q, 8k tokens (9 heads: a partial head block)
    (8, 3, 1, 64, 64),         # SmolLM2-135M k at decode, batch 8
    (4, 32, 1, 128, 128),      # decode
    (2, 8, 1024, 128, 64),     # partial rotary
    (2, 16, 512, 64, 64),
    (1, 12, 257, 96, 96),      # rotary_dim/2 = 48
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("offset", [0, 131072 - 4096], ids=["pos0", "pos126976"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("shape", ROPE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_rope_gpu_parity(shape, interleaved, offset, dtype):
    from llama_trt.plugins.rope.kernel import rope_triton

    B, H, S, D, R = shape
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(B, H, S, D, generator=g, device="cuda").to(dtype)
    pos = offset + torch.arange(S, device="cuda")[None, :] + torch.randint(0, 64, (B, 1), device="cuda", generator=g)
    theta = 500000.0 if D == 128 else 10000.0
    inv = (1.0 / theta ** (torch.arange(0, R, 2, device="cuda", dtype=torch.float64) / R)).to(torch.float32)
    y = rope_triton(x, pos, inv, interleaved, R)
    ref, scale = ref_rope(x.double(), pos, inv, interleaved, R, dtype)
    assert y.dtype == dtype and y.shape == x.shape
    _assert_close(y, ref, dtype, f"RoPE {shape}", scale)
    if R < D:
        assert torch.equal(y[..., R:], x[..., R:])


def test_rope_gpu_positions_near_2_pow_24():
    from llama_trt.plugins.rope.kernel import rope_triton

    x = torch.randn(2, 4, 64, 128, device="cuda")
    pos = (2**24 - 64 + torch.arange(64, device="cuda")).repeat(2, 1)
    inv = (1.0 / 10000.0 ** (torch.arange(0, 128, 2, device="cuda", dtype=torch.float64) / 128)).to(torch.float32)
    for interleaved in (False, True):
        ref, scale = ref_rope(x.double(), pos, inv, interleaved, 128, torch.float32)
        _assert_close(rope_triton(x, pos, inv, interleaved, 128), ref, torch.float32, "RoPE pos ~2^24", scale)


def test_custom_ops_dispatch_to_triton_on_cuda():
    """The model's custom ops run the Triton kernels on CUDA tensors (same bits as a direct launch)."""
    import llama_trt.plugins.rms_norm  # noqa: F401 - registers the ops
    import llama_trt.plugins.rope  # noqa: F401
    from llama_trt.plugins.rms_norm.kernel import rms_norm_triton
    from llama_trt.plugins.rope.kernel import rope_triton

    g = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(2, 7, 576, generator=g, device="cuda").half()
    w = (1 + 0.1 * torch.randn(576, generator=g, device="cuda")).half()
    assert torch.equal(torch.ops.llama_trt.rms_norm(x, w, 1e-5), rms_norm_triton(x, w, 1e-5))
    q = torch.randn(2, 9, 7, 64, generator=g, device="cuda").bfloat16().transpose(1, 2).contiguous().transpose(1, 2)
    pos = torch.arange(7, device="cuda")[None].expand(2, 7)
    inv = (1.0 / 1e5 ** (torch.arange(0, 64, 2, device="cuda", dtype=torch.float64) / 64)).float()
    got = torch.ops.llama_trt.rope(q, pos, inv, False, 64)  # non-contiguous q, as the model passes it
    assert torch.equal(got, rope_triton(q.contiguous(), pos, inv, False, 64))
    ref, scale = ref_rope(q.double(), pos, inv, False, 64, torch.bfloat16)
    _assert_close(got, ref, torch.bfloat16, "RoPE via custom op", scale)
