"""Parity of the Triton RMSNorm / RoPE kernels against independent numpy references.

Without a GPU the kernels run under the Triton interpreter (``TRITON_INTERPRET=1``, CPU
tensors). The variable must be set before ``triton`` is first imported, so it is set at
the top of this module -- only when no CUDA device is present, so that a GPU test run in
the same session (tests/plugins/test_kernels_gpu.py) still gets compiled kernels; with a
GPU this same small sweep runs on CUDA tensors instead.

The references below are written from the semantics, in float64 numpy, rounding to the IO
dtype exactly where the eager ops round (cos/sin and RMSNorm's normalised value, then the
output); they share no code with the kernels. Tolerances are |got - ref| <= atol + rtol*|ref|
with rtol a small number of ulps of the IO dtype (see ``TOL``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

_HAS_CUDA = torch.cuda.is_available()
if "triton" not in sys.modules and not _HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

try:
    import triton  # noqa: F401

    _TRITON_ERR = None
except Exception as e:  # noqa: BLE001
    _TRITON_ERR = f"triton is not importable ({e!r}); pip install triton"

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
if _TRITON_ERR is None and not INTERPRET and not _HAS_CUDA:
    _TRITON_ERR = ("triton was imported before TRITON_INTERPRET=1 could be set and there is no CUDA "
                   "device: run this file in its own pytest process")
DEVICE = "cpu" if INTERPRET else "cuda"

pytestmark = pytest.mark.skipif(_TRITON_ERR is not None, reason=_TRITON_ERR or "")

REPO = Path(__file__).resolve().parents[2]

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_EPS = {"float32": 2.0**-23, "float16": 2.0**-10, "bfloat16": 2.0**-7}
# The Triton interpreter converts float32 -> bfloat16 by truncation (GPUs round to nearest
# even), which costs up to one more ulp per rounding step there.
_ULPS = {"float32": 64, "float16": 2, "bfloat16": 3 if INTERPRET else 2}
TOL = {dt: dict(rtol=_ULPS[dt] * _EPS[dt], atol={"float32": 1e-6, "float16": 1e-5, "bfloat16": 1e-4}[dt])
       for dt in DTYPES}


# ---------------------------------------------------------------------------- references


def _round(a: np.ndarray, dt: str) -> np.ndarray:
    """Round float64 values to ``dt`` (round to nearest even), returned as float64."""
    a = np.asarray(a, dtype=np.float64)
    if dt == "float32":
        return a.astype(np.float32).astype(np.float64)
    if dt == "float16":
        return a.astype(np.float16).astype(np.float64)
    if dt == "bfloat16":
        u = a.astype(np.float32).view(np.uint32).astype(np.uint64)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        return u.astype(np.uint32).view(np.float32).astype(np.float64)
    raise ValueError(dt)


def ref_rms_norm(x: np.ndarray, w: np.ndarray, eps: float, dt: str) -> np.ndarray:
    """y = round(round(x / sqrt(mean(x^2) + eps)) * round(w)) -- HF LlamaRMSNorm rounding points."""
    ms = np.mean(x * x, axis=-1, keepdims=True)
    normed = _round(x / np.sqrt(ms + eps), dt)
    return _round(normed * _round(w, dt), dt)


def ref_rope(x: np.ndarray, pos: np.ndarray, inv_freq: np.ndarray, interleaved: bool, rot: int, dt: str):
    """x [B,H,S,D] float64 (values representable in dt); pos int64 [B,S]; inv_freq float32 [rot/2].

    Returns (out, scale): ``scale`` is |a*cos| + |b*sin| for rotated channels (|x| for the rest),
    the magnitude that rounding errors are proportional to -- the output itself can be far
    smaller after cancellation, so tolerances are relative to ``scale``.
    """
    # the angle is one float32 product (HF: float32 matmul); cos/sin of it, rounded to dt
    ang = pos.astype(np.float32)[:, :, None] * inv_freq.astype(np.float32)[None, None, :]
    cos = _round(np.cos(ang.astype(np.float64)), dt)[:, None]  # [B,1,S,rot/2]
    sin = _round(np.sin(ang.astype(np.float64)), dt)[:, None]
    out = x.copy()
    scale = np.abs(x)
    i1, i2 = (slice(0, rot, 2), slice(1, rot, 2)) if interleaved else (slice(0, rot // 2), slice(rot // 2, rot))
    a, b = x[..., i1], x[..., i2]
    out[..., i1] = a * cos - b * sin
    out[..., i2] = b * cos + a * sin
    scale[..., i1] = np.abs(a * cos) + np.abs(b * sin)
    scale[..., i2] = np.abs(b * cos) + np.abs(a * sin)
    return _round(out, dt), scale


def _inv_freq(rot: int, theta: float) -> np.ndarray:
    return (1.0 / theta ** (np.arange(0, rot, 2, dtype=np.float64) / rot)).astype(np.float32)


def _seed(*key) -> int:
    """Deterministic per-case seed (str hashes are salted per process)."""
    return zlib.crc32(repr(key).encode())


def _tensor(a64: np.ndarray, dt: str):
    """float64 array of dt-representable values -> torch tensor of dtype dt on DEVICE (exact)."""
    return torch.from_numpy(a64.astype(np.float32)).to(DTYPES[dt]).to(DEVICE)


def _np(t) -> np.ndarray:
    return t.detach().float().cpu().numpy().astype(np.float64)


def _assert_close(got: np.ndarray, ref: np.ndarray, dt: str, what: str, scale: np.ndarray | None = None):
    tol = TOL[dt]
    err = np.abs(got - ref)
    bound = tol["atol"] + tol["rtol"] * np.abs(ref if scale is None else scale)
    bad = err > bound
    assert not bad.any(), (
        f"{what} [{dt}]: {int(bad.sum())}/{bad.size} elements out of tolerance "
        f"(rtol={tol['rtol']:.3g}, atol={tol['atol']:.3g}); worst abs err {err.max():.3g} "
        f"at ref={ref.flat[int(np.argmax(err - bound))]:.6g}"
    )


# ---------------------------------------------------------------------------- RMSNorm

RMS_SHAPES = [
    # (shape, max_block_n): max_block_n < hidden forces the looped two-pass path
    ((1, 67), None),
    ((3, 67), None),
    ((2, 5, 64), None),
    ((7, 1000), None),
    ((2, 4096), None),
    ((3, 1000), 256),
    ((2, 67), 16),
]


@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("shape,max_block_n", RMS_SHAPES, ids=lambda v: str(v))
def test_rms_norm_parity(shape, max_block_n, residual, dt):
    from llama_trt.plugins.rms_norm.kernel import rms_norm_triton

    rng = np.random.default_rng(_seed(shape, residual, dt))
    eps = 1e-5
    x = _round(rng.standard_normal(shape) * 2.0, dt)
    w = _round(1.0 + 0.5 * rng.standard_normal(shape[-1]), dt)
    kwargs = {} if max_block_n is None else {"_max_block_n": max_block_n}
    if residual:
        r = _round(rng.standard_normal(shape) * 3.0, dt)
        y, s = rms_norm_triton(_tensor(x, dt), _tensor(w, dt), eps, residual=_tensor(r, dt), **kwargs)
        s_ref = _round(x + r, dt)
        if dt == "bfloat16" and INTERPRET:
            _assert_close(_np(s), s_ref, dt, "fused residual sum")
        else:  # one IEEE add, rounded to the IO dtype: exact
            np.testing.assert_array_equal(_np(s), s_ref, err_msg=f"fused residual sum [{dt}]")
        assert s.dtype == DTYPES[dt] and s.shape == shape
        y_ref = ref_rms_norm(s_ref, w, eps, dt)
    else:
        y = rms_norm_triton(_tensor(x, dt), _tensor(w, dt), eps, **kwargs)
        y_ref = ref_rms_norm(x, w, eps, dt)
    assert y.dtype == DTYPES[dt] and tuple(y.shape) == shape
    _assert_close(_np(y), y_ref, dt, f"RMSNorm {shape}")


def test_rms_norm_fp16_large_values_do_not_overflow():
    """sum(x^2) of fp16 values ~200 over 4096 channels is ~1.6e8 > fp16 max: needs fp32 accumulation."""
    from llama_trt.plugins.rms_norm.kernel import rms_norm_triton

    rng = np.random.default_rng(1)
    x = _round(200.0 * np.sign(rng.standard_normal((2, 4096))), "float16")
    w = _round(np.ones(4096), "float16")
    y = rms_norm_triton(_tensor(x, "float16"), _tensor(w, "float16"), 1e-6)
    got = _np(y)
    assert np.isfinite(got).all()
    _assert_close(got, ref_rms_norm(x, w, 1e-6, "float16"), "float16", "fp16 large values")


def test_rms_norm_weight_dtype_and_eager_op_agree():
    """fp32 weight with fp16 x: cast to x's dtype like the eager op; output stays fp16."""
    from llama_trt.plugins.rms_norm.kernel import rms_norm_triton
    from llama_trt.plugins.rms_norm.op import rms_norm_reference

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 96, generator=g).to(torch.float16)
    w = 1 + 0.1 * torch.randn(96, generator=g)
    y = rms_norm_triton(x.to(DEVICE), w.to(DEVICE), 1e-6).cpu()
    assert y.dtype == torch.float16
    eager = rms_norm_reference(x, w, 1e-6)
    _assert_close(_np(y), _np(eager), "float16", "vs eager op")
    _assert_close(_np(y), ref_rms_norm(_np(x), _np(w), 1e-6, "float16"), "float16", "vs numpy")


def test_rms_norm_rejects_bad_inputs():
    from llama_trt.plugins.rms_norm.kernel import rms_norm_triton

    x = torch.zeros(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm_triton(x, torch.ones(7, device=DEVICE), 1e-6)
    with pytest.raises(ValueError, match="residual must match"):
        rms_norm_triton(x, torch.ones(8, device=DEVICE), 1e-6, residual=torch.zeros(2, 8, dtype=torch.float16,
                                                                                   device=DEVICE))
    with pytest.raises(TypeError):
        rms_norm_triton(x.to(torch.int32), torch.ones(8, device=DEVICE), 1e-6)
    empty = rms_norm_triton(torch.zeros(0, 8, device=DEVICE), torch.ones(8, device=DEVICE), 1e-6)
    assert empty.shape == (0, 8)


# ---------------------------------------------------------------------------- RoPE

ROPE_SHAPES = [
    # (batch, heads, seq, head_dim, rotary_dim)
    (1, 4, 3, 64, 64),
    (2, 3, 5, 128, 128),
    (2, 2, 4, 128, 64),   # partial rotary: half the channels pass through
    (1, 5, 2, 64, 48),    # rotary_dim/2 = 24: not a power of two
    (3, 2, 1, 128, 128),  # decode step (seq = 1)
]


@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("offset", [0, 131072 - 8], ids=["pos0", "pos131064"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("shape", ROPE_SHAPES, ids=lambda v: "x".join(map(str, v)))
def test_rope_parity(shape, interleaved, offset, dt):
    from llama_trt.plugins.rope.kernel import rope_triton

    B, H, S, D, R = shape
    rng = np.random.default_rng(_seed(shape, interleaved, offset, dt))
    x = _round(rng.standard_normal((B, H, S, D)), dt)
    # per-row offsets differ (as with left padding); positions stay non-negative
    pos = (offset + np.arange(S)[None, :] + rng.integers(0, 8, size=(B, 1))).astype(np.int64)
    inv = _inv_freq(R, 500000.0 if D == 128 else 10000.0)
    y = rope_triton(_tensor(x, dt), torch.from_numpy(pos).to(DEVICE), torch.from_numpy(inv).to(DEVICE),
                    interleaved, R)
    assert y.dtype == DTYPES[dt] and tuple(y.shape) == (B, H, S, D)
    got = _np(y)
    ref, scale = ref_rope(x, pos, inv, interleaved, R, dt)
    _assert_close(got, ref, dt, f"RoPE {shape} interleaved={interleaved}", scale)
    if R < D:  # pass-through channels are copied bit for bit
        np.testing.assert_array_equal(got[..., R:], x[..., R:])


def test_rope_positions_up_to_2_pow_24_fp32():
    """Positions near 2^24 convert to float32 exactly and cos/sin use full range reduction."""
    from llama_trt.plugins.rope.kernel import rope_triton

    B, H, S, D = 2, 2, 3, 64
    rng = np.random.default_rng(7)
    x = _round(rng.standard_normal((B, H, S, D)), "float32")
    pos = np.array([[2**24 - 3, 2**24 - 2, 2**24 - 1], [1_000_003, 5_000_011, 12_345_677]], dtype=np.int64)
    inv = _inv_freq(D, 10000.0)
    for interleaved in (False, True):
        y = rope_triton(_tensor(x, "float32"), torch.from_numpy(pos).to(DEVICE), torch.from_numpy(inv).to(DEVICE),
                        interleaved, D)
        ref, scale = ref_rope(x, pos, inv, interleaved, D, "float32")
        _assert_close(_np(y), ref, "float32", "RoPE pos ~2^24", scale)


def test_rope_broadcast_positions_and_eager_op_agree():
    """[1, seq] position_ids broadcast over the batch; kernel == the package's eager op."""
    from llama_trt.plugins.rope.kernel import rope_triton
    from llama_trt.plugins.rope.op import rope_reference

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 6, 64, generator=g).to(torch.float16)
    pos = torch.arange(100, 106).unsqueeze(0)
    inv = torch.from_numpy(_inv_freq(64, 10000.0))
    for interleaved in (False, True):
        y = rope_triton(x.to(DEVICE), pos.to(DEVICE), inv.to(DEVICE), interleaved, 64).cpu()
        eager = rope_reference(x, pos.expand(2, 6), inv, interleaved, 64)
        # eager rounds after each fp16 product and the sum; the kernel rounds once
        ref, scale = ref_rope(_np(x), pos.expand(2, 6).numpy(), inv.numpy(), interleaved, 64, "float16")
        _assert_close(_np(y), ref, "float16", "vs numpy", scale)
        _assert_close(_np(y), _np(eager), "float16", "vs eager op", scale)


def test_rope_rejects_bad_inputs():
    from llama_trt.plugins.rope.kernel import rope_triton

    x = torch.zeros(1, 2, 3, 64, device=DEVICE)
    pos = torch.zeros(1, 3, dtype=torch.int64, device=DEVICE)
    inv = torch.ones(32, device=DEVICE)
    with pytest.raises(ValueError, match="rotary_dim"):
        rope_triton(x, pos, inv, False, 63)
    with pytest.raises(ValueError, match="exceeds head_dim"):
        rope_triton(x, pos, torch.ones(40, device=DEVICE), False, 80)
    with pytest.raises(ValueError, match="inv_freq"):
        rope_triton(x, pos, torch.ones(16, device=DEVICE), False, 64)
    with pytest.raises(ValueError, match="position_ids"):
        rope_triton(x, torch.zeros(1, 4, dtype=torch.int64, device=DEVICE), inv, False, 64)
    with pytest.raises(ValueError, match=r"\[batch, heads, seq, head_dim\]"):
        rope_triton(x[0], pos, inv, False, 64)


# ---------------------------------------------------------------------------- AOT / TensorRT


_AOT_SCRIPT = textwrap.dedent(
    """
    import re, sys
    sys.path.insert(0, sys.argv[1])
    from triton.backends.compiler import GPUTarget
    from llama_trt.plugins.rms_norm.trt_plugin import build_rms_norm_ptx
    from llama_trt.plugins.rope.trt_plugin import build_rope_ptx

    def n_params(k):
        entry = re.search(r"\\.entry\\s+" + re.escape(k.name) + r"\\s*\\((.*?)\\)", k.ptx, re.S).group(1)
        return entry.count(".param")

    target = GPUTarget("cuda", 80, 32)
    k, cfg = build_rms_norm_ptx("fp16", "fp16", 4096, 1e-6, target=target)
    assert n_params(k) == 5 and k.block_x == cfg.num_warps * 32, (n_params(k), k.block_x)
    k, cfg = build_rms_norm_ptx("bf16", "fp32", 67, 1e-5, target=target)
    assert n_params(k) == 5
    k, cfg = build_rms_norm_ptx("fp32", "fp32", 40000, 1e-5, has_residual=True, target=target)
    assert n_params(k) == 7 and not cfg.SINGLE_PASS
    for dt, hd, rot, il in [("fp16", 128, 128, False), ("bf16", 128, 64, True)]:
        k, cfg = build_rope_ptx(dt, hd, rot, il, 32, target=target)
        assert n_params(k) == 6, n_params(k)
        assert "sin.approx" not in k.ptx and "cos.approx" not in k.ptx
    print("AOT-OK")
    """
)


def test_aot_ptx_compiles_with_trt_launch_signature(tmp_path):
    """The kernels compile to PTX (sm_80, no GPU needed) with exactly the parameters TensorRT's
    AOT launch passes: inputs, int32 scalars, outputs (Triton's unused scratch params removed).
    Runs in a subprocess: compiled kernels need triton imported without TRITON_INTERPRET."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends import backends

        if "nvidia" not in backends:
            pytest.skip("this triton build has no NVIDIA backend (needed to emit PTX)")
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"triton has no AOT compiler here: {e!r}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT, str(REPO)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "AOT-OK" in proc.stdout, proc.stdout + proc.stderr


def test_strip_unused_trailing_params():
    from llama_trt.plugins.rms_norm.trt_plugin import strip_unused_trailing_params

    ptx = (".visible .entry k(\n\t.param .u64 k_param_0,\n\t.param .u32 k_param_1,\n"
           "\t.param .u64 k_param_2,\n\t.param .u64 k_param_3\n)\n{\n\tld.param.b64 %rd1, [k_param_0];\n"
           "\tld.param.b32 %r1, [k_param_1];\n}\n")
    out = strip_unused_trailing_params(ptx, "k", 2)
    assert "k_param_2" not in out and "k_param_3" not in out and "[k_param_1]" in out
    assert strip_unused_trailing_params(ptx, "k", 4) == ptx
    used = ptx.replace("[k_param_1]", "[k_param_3]")
    with pytest.raises(ValueError, match="hidden parameter"):
        strip_unused_trailing_params(used, "k", 2)


def _trt_plugin_or_skip():
    try:
        import tensorrt  # noqa: F401
        import tensorrt.plugin as trtp
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"full TensorRT with tensorrt.plugin is not installed ({e!r}); "
                    "the registration code is exercised only where it is importable")
    return trtp


def test_trt_plugin_registration():
    trtp = _trt_plugin_or_skip()
    import tensorrt as trt

    from llama_trt.plugins.rms_norm.trt_plugin import register_plugins as reg_rms
    from llama_trt.plugins.rope.trt_plugin import register_plugins as reg_rope

    mode = "aot" if hasattr(trt, "QuickPluginCreationRequest") else "jit"
    assert reg_rms(mode) == "llama_trt::RMSNorm"
    assert reg_rope(mode) == "llama_trt::RotaryEmbedding"
    # idempotent
    assert reg_rms(mode) == "llama_trt::RMSNorm"
    assert reg_rope(mode) == "llama_trt::RotaryEmbedding"
    assert hasattr(trtp.op.llama_trt, "RMSNorm") and hasattr(trtp.op.llama_trt, "RotaryEmbedding")

    registry = trt.get_plugin_registry()
    expected = {
        "RMSNorm": {"epsilon": trt.PluginFieldType.FLOAT32},
        "RotaryEmbedding": {"interleaved": trt.PluginFieldType.INT32, "rotary_dim": trt.PluginFieldType.INT32},
    }
    for name, fields in expected.items():
        creator = registry.get_creator(name, "1", "llama_trt")
        assert creator is not None, f"no creator for llama_trt::{name}"
        got = {f.name: f.type for f in creator.field_names}
        assert got == fields, (name, got)
