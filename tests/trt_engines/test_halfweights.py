"""The build-time fp16 weight path (no TensorRT): graph form and ONNX Runtime logits."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from llama_trt.trt_engines.halfweights import halve_float_weights


def _logits(model, manifest, ids):
    import onnxruntime as ort

    from llama_trt.exporter.feeds import build_feeds

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # the ONNX semantics, not ORT's fused int8 kernels (they quantize activations on the fly)
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return s.run(None, build_feeds(manifest, ids))[0]


@pytest.mark.parametrize("scheme", ["int8-weight", "int4-rtn"])
def test_half_weight_path_keeps_logits_and_io(tied_exports, scheme):
    from llama_trt.exporter import load_manifest

    # int8-weight with its head float: the fp32-read tied table the pass halves (the int8 head's is int8)
    folder = tied_exports(scheme, **({"quantize_lm_head": False} if scheme == "int8-weight" else {}))
    manifest = load_manifest(folder)
    model = onnx.load(str(manifest.model_path(folder)))
    halved = onnx.ModelProto()
    halved.CopyFrom(model)
    report = halve_float_weights(halved)

    dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    g = model.graph
    big = lambda dtype: {i.name for i in g.initializer if i.data_type == dtype and len(i.dims) == 2  # noqa: E731
                         and np.prod(i.dims) >= 1 << 16}
    # a table stored fp32, or stored fp16 and read through Cast(to=float) (int8 schemes' tied table)
    tables = big(TensorProto.FLOAT) | {n.output[0] for n in g.node
                                       if n.op_type == "Cast" and n.input[0] in big(TensorProto.FLOAT16)}
    transposed = {n.output[0] for n in g.node if n.op_type == "Transpose" and n.input[0] in tables}
    weights = {n.output[0] for n in dqs} | tables | transposed
    assert report.dequantize == len(dqs) > 0
    assert report.tables == len(tables)
    assert report.matmuls == sum(n.op_type == "MatMul" and n.input[1] in weights for n in g.node)
    assert report.gathers == sum(n.op_type == "Gather" and n.input[0] in tables for n in g.node)
    if scheme == "int8-weight":  # the float tied embedding: read by the Gather and the lm head
        assert report.tables == 1 and report.gathers == 1
    inits = {i.name: i for i in halved.graph.initializer}
    for n in (n for n in halved.graph.node if n.op_type == "DequantizeLinear"):
        assert inits[n.input[0]].data_type in (TensorProto.INT8, TensorProto.INT4)
        assert inits[n.input[1]].data_type == TensorProto.FLOAT16
    big_float = [i.name for i in halved.graph.initializer if i.data_type == TensorProto.FLOAT and len(i.dims) == 2
                 and np.prod(i.dims) >= 1 << 16]
    assert big_float == []
    # the engine's I/O contract is the export's
    io = lambda m: [(v.name, v.type.tensor_type.elem_type) for v in (*m.graph.input, *m.graph.output)]  # noqa: E731
    assert io(halved) == io(model)
    onnx.checker.check_model(halved)

    ids = np.random.default_rng(0).integers(0, manifest.llama_config.vocab_size, (1, 9))
    ref, got = _logits(model, manifest, ids), _logits(halved, manifest, ids)
    assert got.dtype == np.float32
    # fp16 storage of the fp32 table and fp16 GEMM inputs: fp16-rounding-sized differences (the
    # fp16 export of this model differs from its fp32 export by at most 0.0074 here)
    np.testing.assert_allclose(got, ref, atol=2e-2, rtol=0)
    assert np.mean(np.argmax(got, -1) == np.argmax(ref, -1)) >= 0.85


def test_fp32_graph_without_qdq_is_left_alone_by_the_builder(tied_exports, tmp_path):
    """write_lowered applies the pass only to Q/DQ exports with fp32 activations."""
    from llama_trt.exporter import load_manifest
    from llama_trt.trt_engines.builder import write_lowered
    from llama_trt.trt_engines.lowering import LoweringOptions

    folder = tied_exports("fp32")
    manifest = load_manifest(folder)
    _, _, precision, halved = write_lowered(manifest.model_path(folder), tmp_path, LoweringOptions(64),
                                            half_weights=True)
    assert precision == "fp32" and halved is None


def test_w8a8_gemm_is_left_whole():
    """An activation Q/DQ pair on the MatMul (int8-sq): no fp16 Casts, the weight scale stays fp32."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    q = rng.integers(-127, 128, (256, 256)).astype(np.int8)
    inits = [numpy_helper.from_array(q, "w_q"), numpy_helper.from_array(np.full(256, 0.01, np.float32), "w_s"),
             numpy_helper.from_array(np.array(0.02, np.float32), "x_s")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_s"], ["x_q"]),
             helper.make_node("DequantizeLinear", ["x_q", "x_s"], ["x_dq"]),
             helper.make_node("DequantizeLinear", ["w_q", "w_s"], ["w"], axis=1),
             helper.make_node("MatMul", ["x_dq", "w"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 256])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 256])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    before = model.SerializeToString()
    report = halve_float_weights(model)
    assert report.dequantize == 0 and report.matmuls == 0
    assert model.SerializeToString() == before
