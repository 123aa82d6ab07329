"""A quantized table read by an embedding ``Gather`` and by the lm head's DequantizeLinear (an
int4 export's tied weights): the session rewrite gives the DQ its own entries, so ONNX Runtime
fuses DQ + MatMul into ``MatMulNBits`` instead of dequantizing the whole table every step;
outputs unchanged."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from llama_trt.runtime.sessions.ort_lowering import _unshare_quantized_weights

H, V = 64, 256


def _tied_model():
    rng = np.random.default_rng(0)
    q = rng.integers(-127, 128, (H, V), dtype=np.int8)  # [K, N] head layout; the embedding reads columns
    scale = rng.uniform(0.001, 0.01, V).astype(np.float32)
    inits = [numpy_helper.from_array(q, "table_q"), numpy_helper.from_array(scale, "table_scale"),
             numpy_helper.from_array(np.zeros(V, dtype=np.int8), "table_zp")]
    nodes = [
        helper.make_node("Gather", ["table_q", "ids"], ["rows_q"], axis=1),
        helper.make_node("Gather", ["table_scale", "ids"], ["rows_s"]),
        helper.make_node("Cast", ["rows_q"], ["rows_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["rows_f", "rows_s"], ["emb_t"]),
        helper.make_node("Transpose", ["emb_t"], ["emb"], perm=[1, 2, 0]),
        helper.make_node("DequantizeLinear", ["table_q", "table_scale", "table_zp"], ["w"], axis=1, name="dq"),
        helper.make_node("MatMul", ["emb", "w"], ["logits"]),
    ]
    g = helper.make_graph(nodes, "tied", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 3])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)], initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)])


def _run(model, tmp_path, tag):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / f"{tag}.onnx")
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    out = sess.run(None, {"ids": np.array([[3, 17, 200]])})[0]
    ops = {n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node}
    return out, ops


def test_tied_quantized_table_is_fused_after_unsharing(tmp_path):
    plain = _tied_model()
    ref, ops_before = _run(plain, tmp_path, "plain")
    assert "MatMulNBits" not in ops_before  # the shared table blocks ORT's fusion
    model = _tied_model()
    assert _unshare_quantized_weights(model) == 1
    got, ops_after = _run(model, tmp_path, "unshared")
    assert "MatMulNBits" in ops_after and "DequantizeLinear" not in ops_after
    # independent reference: numpy dequantization of the same table
    q = numpy_helper.to_array(plain.graph.initializer[0]).astype(np.float32)
    s = numpy_helper.to_array(plain.graph.initializer[1])
    w = q * s
    emb = w[:, [3, 17, 200]].T[None]
    np.testing.assert_allclose(ref, emb @ w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, ref, rtol=2e-2, atol=2e-2 * np.abs(ref).max())
