"""Profiles, profile selection, compatibility checks, header decoding, backend detection (no TensorRT needed)."""

from __future__ import annotations

import struct

import pytest

from llama_trt.errors import BackendUnavailableError, BuildError, GenerationError
from llama_trt.trt_engines import backend as B
from llama_trt.trt_engines.compat import compatibility_problems
from llama_trt.trt_engines.header import decode_engine_header
from llama_trt.trt_engines.profiles import ShapeLimits, make_profiles, select_profile

RTX = B.Backend("tensorrt_rtx", "tensorrt_rtx_bindings", "1.7.1.116", True, False, ("75", "80", "86", "89", "120", "121"))
TRT = B.Backend("tensorrt", "tensorrt", "10.15.1.29", False, True)


def test_profiles_keep_mask_equal_past_plus_seq():
    pre, dec = make_profiles(ShapeLimits(4, 64, 256))
    assert (pre.index, pre.min, pre.opt, pre.max) == (0, (1, 1, 0), (1, 32, 0), (4, 64, 0))
    assert (dec.index, dec.min, dec.opt, dec.max) == (1, (1, 1, 0), (1, 1, 128), (4, 1, 255))
    names = ["input_ids", "attention_mask", "position_ids", "past_key_values.0.key"]
    for p in (pre, dec):
        shapes = p.input_shapes(names, num_kv_heads=2, head_dim=16)
        for point in range(3):
            ids, mask, pos, kv = (shapes[n][point] for n in names)
            assert mask[1] == kv[2] + ids[1] and pos == ids and kv[1:] != () and kv[0] == ids[0]
    with pytest.raises(BuildError, match="not part of the llama-trt IO contract"):
        pre.input_shapes(["pixel_values"], 2, 16)


@pytest.mark.parametrize("limits,needle", [
    (ShapeLimits(1, 300, 200), "--max-seq 300 exceeds --max-context 200"),
    (ShapeLimits(1, 8, 4096), "--max-context 4096 exceeds the model's max_position_embeddings (2048)"),
    (ShapeLimits(0, 8, 64), "--max-batch must be an integer >= 1"),
    (ShapeLimits(1, 0, 64), "--max-seq must be an integer >= 1"),
])
def test_limits_validation_names_the_option(limits, needle):
    with pytest.raises(BuildError) as e:
        limits.validate(2048)
    assert needle in str(e.value)


def test_select_profile_by_phase():
    profiles = make_profiles(ShapeLimits(2, 16, 64))
    assert select_profile(profiles, batch=1, seq=16, past=0) == 0
    assert select_profile(profiles, batch=2, seq=1, past=0) == 0  # a one-token prompt is still prefill
    assert select_profile(profiles, batch=2, seq=1, past=1) == 1
    assert select_profile(profiles, batch=1, seq=1, past=63) == 1
    with pytest.raises(GenerationError, match="multi-token steps only on an empty cache"):
        select_profile(profiles, batch=1, seq=4, past=3)
    with pytest.raises(GenerationError, match="outside the engine's shape limits"):
        select_profile(profiles, batch=3, seq=1, past=0)
    with pytest.raises(GenerationError, match="outside"):
        select_profile(profiles, batch=1, seq=1, past=64)
    with pytest.raises(GenerationError):
        select_profile(profiles, batch=1, seq=17, past=0)


def test_compat_rtx_engine_on_h100_says_sm90_unsupported():
    problems = compatibility_problems("tensorrt_rtx", "1.7.1.116", ("89", "120"), RTX, "90")
    assert len(problems) == 1
    assert problems[0].startswith("TensorRT-RTX does not support sm_90 (Hopper, e.g. H100/H200)")


def test_compat_cases():
    assert compatibility_problems("tensorrt_rtx", "1.7.1.116", ("89", "120"), RTX, "89") == []
    assert compatibility_problems("tensorrt_rtx", "1.7.1.5", ("89",), RTX, "89") == []  # same release
    (p,) = compatibility_problems("tensorrt_rtx", "1.7.1.116", ("89", "120"), RTX, "86")
    assert "targets sm_89, sm_120 but this GPU is sm_86" in p and "--target 86" in p
    (p,) = compatibility_problems("tensorrt_rtx", "1.6.0.1", ("89",), RTX, "89")
    assert "TensorRT-RTX 1.6.0.1" in p and "only runs on the release that built it" in p
    (p,) = compatibility_problems("tensorrt_rtx", "1.7.1.116", ("89",), TRT, "89")
    assert "do not move between TensorRT and TensorRT-RTX" in p
    (p,) = compatibility_problems("tensorrt_rtx", "1.7.1.116", ("89",), None, "89")
    assert "tensorrt-rtx-cu13-libs" in p and "not installed" in p
    problems = compatibility_problems("tensorrt_rtx", "1.7.1.116", ("89",), RTX, None)
    assert problems == ["no NVIDIA GPU found (CUDA driver not available); TensorRT engines need a GPU: run the ONNX "
                        "export with --backend onnxruntime instead"]
    assert compatibility_problems("tensorrt", "10.15.1.29", ("90",), TRT, "90") == []
    (p,) = compatibility_problems("tensorrt", "10.15.1.29", ("90",), TRT, "89")
    assert "GPU-specific" in p


def test_header_decoding():
    raw = bytearray(64)
    raw[:4] = b"vtrt"
    struct.pack_into("<I", raw, 8, 2)
    struct.pack_into("<Q", raw, 0x10, 12345)
    raw[0x18:0x1B] = bytes([1, 7, 1])
    struct.pack_into("<Q", raw, 0x20, 0b1011000)  # SM89, SM120, bit 6
    h = decode_engine_header(bytes(raw))
    assert h["version"] == "1.7.1" and h["size"] == 12345
    assert h["compute_capabilities"] == ["89", "120"] and h["unknown_bits"] == [6]
    assert decode_engine_header(b"ftrt" + bytes(60)) is None


def test_normalize_target():
    assert [B.normalize_target(t) for t in ("89", "8.9", "sm_89", "SM120", (12, 0), 86)] == [
        "89", "89", "89", "120", "120", "86"]
    with pytest.raises(BuildError, match="--target 'ampere'"):
        B.normalize_target("ampere")


def test_target_validation_per_backend():
    assert B.validate_targets(RTX, ["8.9", "89", "120"]) == ("89", "120")
    with pytest.raises(BuildError, match=r"--target 90: .*sm_90 / Hopper is not supported by TensorRT-RTX"):
        B.validate_targets(RTX, ["90"])
    with pytest.raises(BuildError, match="only supported by TensorRT-RTX"):
        B.validate_targets(TRT, ["89"])
    assert B.validate_targets(TRT, []) == ()


def test_backend_unavailable_names_what_to_install(monkeypatch):
    monkeypatch.delenv(B.ENV_VAR, raising=False)
    monkeypatch.setattr(B, "_import_flavour", lambda name: (None, f"{name}: No module"))
    with pytest.raises(BackendUnavailableError) as e:
        B.detect_backend()
    assert "tensorrt-rtx-cu13-libs" in str(e.value) and "NVIDIA's index" in str(e.value)
    monkeypatch.setenv(B.ENV_VAR, "tensorrt")
    with pytest.raises(BackendUnavailableError, match="LLAMA_TRT_BACKEND=tensorrt asks for tensorrt"):
        B.detect_backend()
    monkeypatch.setenv(B.ENV_VAR, "cuda")
    with pytest.raises(BackendUnavailableError, match="unknown TensorRT backend 'cuda'"):
        B.detect_backend()


def test_env_override_picks_rtx(monkeypatch):
    from tests.trt_engines.conftest import trt_backend_or_reason

    backend, reason = trt_backend_or_reason()
    if backend is None or not any(b.is_rtx for b in B.available_backends()):
        pytest.skip(f"tensorrt_rtx_bindings not importable {reason}")
    monkeypatch.setenv(B.ENV_VAR, "tensorrt_rtx")
    b = B.detect_backend()
    assert b.is_rtx and b.can_build_without_gpu and not b.supports_custom_plugins
    assert "89" in b.aot_targets and "90" not in b.aot_targets
    import sys

    assert "tensorrt_rtx" in sys.modules  # alias for Polygraphy's RTX mode
