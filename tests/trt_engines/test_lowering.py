"""The lowering pass (no TensorRT): ONNX Runtime gives the same logits before and after."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from llama_trt.errors import BuildError
from llama_trt.trt_engines.lowering import (
    LoweringOptions, count_fused_nodes, detect_precision, lower_model, rope_caches,
)

TOL = {"fp32": 1e-4, "fp16": 2e-2}


def _run(model_proto, feeds):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    s = ort.InferenceSession(model_proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return s.run(None, feeds)


def _prefill_and_decode(manifest, model, ids):
    from llama_trt.exporter.feeds import build_feeds, split_outputs

    outs = _run(model, build_feeds(manifest, ids))
    _, presents = split_outputs(manifest, outs)
    nxt = ids[:, -1:]
    step = _run(model, build_feeds(manifest, nxt, past=presents))
    return outs, step


@pytest.mark.parametrize("kind,dtype", [("tiny", "fp32"), ("tiny", "fp16"), ("stories", "fp32"), ("stories", "fp16")])
def test_native_rope_matches_function_bodies_in_ort(exports, kind, dtype):
    from llama_trt.exporter import load_manifest

    folder = exports(kind, dtype)
    manifest = load_manifest(folder)
    model = onnx.load(str(manifest.model_path(folder)))
    cfg = manifest.llama_config
    assert cfg.rope_interleaved == (kind == "stories")  # both pairings covered
    lowered, routes = lower_model(model, LoweringOptions(max_context=cfg.max_position_embeddings))
    by_op = {r.op: r for r in routes}
    assert by_op["llama_trt.RotaryEmbedding"].route == "native"
    assert by_op["llama_trt.RotaryEmbedding"].count == 2 * cfg.num_layers
    assert by_op["llama_trt.RMSNorm"].route == "function"
    assert count_fused_nodes(lowered) == {"RMSNorm": 2 * cfg.num_layers + 1}
    native = [n for n in lowered.graph.node if n.op_type == "RotaryEmbedding"]
    assert len(native) == 2 * cfg.num_layers and all(n.domain == "" for n in native)
    assert {a.name: onnx.helper.get_attribute_value(a) for a in native[0].attribute}["interleaved"] == int(
        cfg.rope_interleaved)
    assert [f.name for f in lowered.functions] == ["RMSNorm"]  # RoPE function dropped
    onnx.checker.check_model(lowered)

    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 11))
    ref, ref_step = _prefill_and_decode(manifest, model, ids)
    got, got_step = _prefill_and_decode(manifest, lowered, ids)
    for a, b in zip(ref + ref_step, got + got_step):
        np.testing.assert_allclose(b.astype(np.float64), a.astype(np.float64), atol=TOL[dtype], rtol=0)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_rms_normalization_flag_matches_too(exports, dtype):
    from llama_trt.exporter import load_manifest
    from llama_trt.exporter.feeds import build_feeds

    folder = exports("tiny", dtype)
    manifest = load_manifest(folder)
    model = onnx.load(str(manifest.model_path(folder)))
    lowered, routes = lower_model(model, LoweringOptions(max_context=64, rms_norm_native=True))
    assert {r.op: r.route for r in routes} == {"llama_trt.RMSNorm": "native", "llama_trt.RotaryEmbedding": "native"}
    assert not lowered.functions and count_fused_nodes(lowered) == {}
    assert all(o.domain != "llama_trt" for o in lowered.opset_import)
    feeds = build_feeds(manifest, np.arange(9).reshape(1, 9) % manifest.llama_config.vocab_size)
    for a, b in zip(_run(model, feeds), _run(lowered, feeds)):
        np.testing.assert_allclose(b.astype(np.float64), a.astype(np.float64), atol=TOL[dtype], rtol=0)


def test_plugin_route_tags_nodes_and_keeps_functions(exports):
    folder = exports("tiny", "fp32")
    model = onnx.load(str(folder / "model.onnx"))
    lowered, routes = lower_model(model, LoweringOptions(max_context=64, plugins=True))
    assert {r.route for r in routes} == {"plugin"}
    fused = [n for n in lowered.graph.node if n.domain == "llama_trt"]
    assert fused and all(
        any(a.name == "plugin_namespace" and a.s == b"llama_trt" for a in n.attribute) for n in fused)
    assert not any(a.name == "plugin_namespace" for n in model.graph.node for a in n.attribute)  # input untouched


def test_rope_caches_are_float64_angles_cast_last():
    inv = np.array([1.0, 0.01], dtype=np.float32)
    cos, sin = rope_caches(inv, 5000, np.float16)
    assert cos.shape == sin.shape == (5000, 2) and cos.dtype == np.float16
    exact = np.cos(4999 * np.float64(np.float32(0.01)))
    assert abs(float(cos[4999, 1]) - exact) < 1e-3


def test_non_constant_inv_freq_names_the_node(exports):
    folder = exports("tiny", "fp32")
    model = onnx.load(str(folder / "model.onnx"))
    rope = next(n for n in model.graph.node if n.op_type == "RotaryEmbedding")
    inv = rope.input[2]
    init = next(i for i in model.graph.initializer if i.name == inv)
    model.graph.initializer.remove(init)
    model.graph.input.append(onnx.helper.make_tensor_value_info(inv, onnx.TensorProto.FLOAT, [None]))
    with pytest.raises(BuildError, match=rf"node '{rope.name}'.*inv_freq.*not an initializer"):
        lower_model(model, LoweringOptions(max_context=64))


def test_precision_detection(exports):
    from tests.trt_engines.qdq import quantize_weights_qdq

    m32 = onnx.load(str(exports("tiny", "fp32") / "model.onnx"))
    m16 = onnx.load(str(exports("tiny", "fp16") / "model.onnx"))
    assert detect_precision(m32) == "fp32" and detect_precision(m16) == "fp16"
    assert detect_precision(quantize_weights_qdq(m32)) == "int8"
