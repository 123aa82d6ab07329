"""What an ONNX Runtime session says and sizes at open.

int8-sq exports (int8 activations through Q/DQ) are made for TensorRT: on ONNX Runtime's CPU
kernels they run several times slower than fp32, so the session says so at open; int8-weight
exports (made for CPUs too) open quietly. ``max_context`` sizes the session (and serve's
engine) below the export's context."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def quantized(stories_export, stories260k, tmp_path_factory):
    from llama_trt.checkpoint import load_checkpoint
    from llama_trt.exporter.quantize import parse_options, quantize_folder

    sd = load_checkpoint(stories260k).state_dict
    root = tmp_path_factory.mktemp("q")
    out = {}
    for scheme in ("int8-sq", "int8-weight"):
        (root / scheme).mkdir()
        # stories260K misses int8-sq's accuracy target: accepted here, the test is about the warning
        kw = {"sq_target_kl": 1.0} if scheme == "int8-sq" else {}
        quantize_folder(stories_export, root / scheme, parse_options(scheme, certify=False, **kw), state_dict=sd)
        out[scheme] = root / scheme
    return out


def test_int8_sq_warns_at_open_that_it_targets_tensorrt(quantized, capfd, tmp_path):
    from llama_trt.runtime import open_session

    s = open_session(quantized["int8-sq"], "onnxruntime", cache_dir=tmp_path)
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(lines) == 1 and "targets TensorRT" in lines[0] and "int8-sq" in lines[0]
    assert "targets TensorRT" in s.describe()["target_warning"]
    open_session(quantized["int8-sq"], "onnxruntime", cache_dir=tmp_path, warn=False)
    assert "warning:" not in capfd.readouterr().err


def test_int8_weight_opens_quietly(quantized, stories_export, capfd, tmp_path):
    from llama_trt.runtime import open_session

    s = open_session(quantized["int8-weight"], "onnxruntime", cache_dir=tmp_path)
    assert "warning:" not in capfd.readouterr().err and s.target_warning is None
    # bench counts int8 weights at 1 byte each: well under the fp32 export's bytes per token
    fp32 = open_session(stories_export, "onnxruntime", cache_dir=tmp_path)
    assert s.graph_reads().weight_bytes_per_token < 0.5 * fp32.graph_reads().weight_bytes_per_token


def test_max_context_sizes_the_session_and_its_cache(stories_export, tmp_path):
    """A context below the export's: the session, the serve engine and the KV buffers follow it."""
    from llama_trt.runtime import open_session
    from llama_trt.runtime.artifact import ArtifactError
    from llama_trt.serve.server import build_engine

    s = open_session(stories_export, "onnxruntime", max_context=64, cache_dir=tmp_path)
    c = s.config
    s.reset(2)
    assert s.max_context == 64 and s._bufs[0][0][0].size == 2 * c.num_kv_heads * 64 * c.head_dim
    assert build_engine(stories_export, backend="onnxruntime", max_context=64).max_context == 64
    with pytest.raises(ArtifactError, match="outside"):
        open_session(stories_export, "onnxruntime", max_context=c.max_position_embeddings + 1)
