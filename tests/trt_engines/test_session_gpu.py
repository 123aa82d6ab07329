"""Engine session on a GPU: logits vs ONNX Runtime over prefill + decode (skips without a GPU)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.tensorrt]


@pytest.fixture(scope="module")
def gpu(trt_backend):
    from llama_trt.trt_engines.compat import RTX_UNSUPPORTED, gpu_compute_capability

    info = gpu_compute_capability()
    if info is None:
        pytest.skip("no NVIDIA GPU (CUDA driver) on this machine")
    if trt_backend.is_rtx and info.compute_capability in RTX_UNSUPPORTED:
        pytest.skip(f"TensorRT-RTX does not support sm_{info.compute_capability} ({info.name})")
    return info


def _build_for_gpu(exports, gpu, trt_backend, tmp_path, dtype):
    from llama_trt.trt_engines import BuildOptions, build_engine

    targets = (gpu.compute_capability,) if trt_backend.is_rtx else ()
    out = tmp_path / f"engine_{dtype}"
    build_engine(exports("tiny", dtype), out, BuildOptions(max_batch=2, max_seq=16, max_context=64, targets=targets))
    return out


@pytest.mark.parametrize("dtype,atol", [("fp32", 1e-3), ("fp16", 5e-2)])
def test_engine_logits_match_onnxruntime(exports, trt_backend, gpu, tmp_path, dtype, atol):
    from llama_trt.exporter import load_manifest
    from llama_trt.exporter.feeds import build_feeds, ort_session, positions_from_mask, split_outputs
    from llama_trt.runtime.sessions.tensorrt_session import TensorRTSession

    engine_dir = _build_for_gpu(exports, gpu, trt_backend, tmp_path, dtype)
    export_dir = exports("tiny", dtype)
    manifest = load_manifest(export_dir)
    ort = ort_session(export_dir)
    ids = np.random.default_rng(0).integers(3, manifest.llama_config.vocab_size, (2, 7))
    mask = np.ones_like(ids)
    with TensorRTSession(engine_dir) as s:
        s.reset(2, 64)
        got = s.prefill(ids, mask, positions_from_mask(mask, 7))
        ref_out = ort.run(None, build_feeds(manifest, ids, mask))
        ref, presents = split_outputs(manifest, ref_out)
        np.testing.assert_allclose(got, ref, atol=atol, rtol=0)
        for _ in range(4):  # decode: present of step t is past of step t+1 on the device
            nxt = ref[:, -1:].argmax(-1)
            mask = np.ones((2, mask.shape[1] + 1), dtype=np.int64)
            got = s.step(nxt, mask, positions_from_mask(mask, 1))
            ref_out = ort.run(None, build_feeds(manifest, nxt, mask, past=presents))
            ref, presents = split_outputs(manifest, ref_out)
            np.testing.assert_allclose(got, ref, atol=atol, rtol=0)
        k0, _ = s.kv_cache()[0]
        np.testing.assert_allclose(k0.astype(np.float32), presents[0].astype(np.float32), atol=atol, rtol=0)


def test_session_does_not_import_torch(exports, trt_backend, gpu, tmp_path):
    engine_dir = _build_for_gpu(exports, gpu, trt_backend, tmp_path, "fp16")
    code = ("import sys; from llama_trt.runtime.sessions.tensorrt_session import TensorRTSession as S; "
            f"s = S({str(engine_dir)!r}); s.reset(1, 8); s.prefill([[1, 2, 3]], [[1, 1, 1]], [[0, 1, 2]]); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
