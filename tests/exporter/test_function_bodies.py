"""Each plugin's ONNX function body alone (one-node model in ONNX Runtime) vs its torch eager op."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from llama_trt.plugins import all_specs
from llama_trt.plugins.onnx_support import onnx_parts, register_all_schemas
from llama_trt.plugins.rms_norm import rms_norm
from llama_trt.plugins.rope import rope

ONNX_TYPES = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16}
HEAD_DIM = 16


def spec(op_type):
    return next(s for s in all_specs() if s.op_type == op_type)


def one_node_model(node, inputs, outputs, op_type):
    register_all_schemas()
    fn = onnx_parts(spec(op_type)).function_proto(23)
    graph = helper.make_graph([node], "one_node", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("llama_trt", 1)],
                              functions=[fn])
    onnx.checker.check_model(model, full_check=True)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def assert_close(got: np.ndarray, want: torch.Tensor, term_scale: float = 0.0):
    """fp32: 1e-5. fp16: 2 ulps of the result plus 1 ulp of the largest intermediate term
    (``term_scale``): cos/sin and 1/sqrt round differently in ORT and torch, and one ulp
    in a*cos or b*sin survives the subtraction a*cos - b*sin."""
    want = want.numpy()
    assert got.dtype == want.dtype
    if want.dtype == np.float16:
        tol = 2 * np.spacing(np.abs(want)).astype(np.float32) + float(np.spacing(np.float16(term_scale))) + 1e-7
        assert (np.abs(got.astype(np.float32) - want.astype(np.float32)) <= tol).all()
    else:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("rotary_dim", [HEAD_DIM, 8], ids=["full", "partial"])
def test_rope_function_matches_torch_op(dtype, interleaved, rotary_dim):
    t = ONNX_TYPES[dtype]
    node = helper.make_node("RotaryEmbedding", ["x", "pos", "inv_freq"], ["y"], domain="llama_trt",
                            interleaved=int(interleaved), rotary_dim=rotary_dim)
    sess = one_node_model(
        node,
        [helper.make_tensor_value_info("x", t, ["b", "h", "s", HEAD_DIM]),
         helper.make_tensor_value_info("pos", TensorProto.INT64, ["b", "s"]),
         helper.make_tensor_value_info("inv_freq", TensorProto.FLOAT, [rotary_dim // 2])],
        [helper.make_tensor_value_info("y", t, ["b", "h", "s", HEAD_DIM])],
        "RotaryEmbedding",
    )
    g = torch.Generator().manual_seed(rotary_dim + 2 * interleaved)
    x = torch.randn(2, 3, 5, HEAD_DIM, generator=g).to(dtype)
    pos = torch.randint(0, 4000, (2, 5), generator=g)  # large positions: angles must be fp32
    inv_freq = torch.tensor([10000.0 ** (-2 * i / rotary_dim) for i in range(rotary_dim // 2)], dtype=torch.float32)
    got = sess.run(None, {"x": x.numpy(), "pos": pos.numpy(), "inv_freq": inv_freq.numpy()})[0]
    want = rope(x, pos, inv_freq, interleaved, rotary_dim)
    assert_close(got, want, term_scale=float(x.abs().max()))
    if rotary_dim < HEAD_DIM:  # pass-through channels are untouched
        np.testing.assert_array_equal(got[..., rotary_dim:], x[..., rotary_dim:].numpy())
    # the other pairing gives a different result (the attribute is honoured)
    other = rope(x, pos, inv_freq, not interleaved, rotary_dim).numpy().astype(np.float32)
    assert np.abs(got.astype(np.float32) - other).max() > 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("epsilon", [1e-5, 1e-2])
def test_rms_norm_function_matches_torch_op(dtype, epsilon):
    t = ONNX_TYPES[dtype]
    node = helper.make_node("RMSNorm", ["x", "w"], ["y"], domain="llama_trt", epsilon=epsilon)
    hidden = 512
    sess = one_node_model(
        node,
        [helper.make_tensor_value_info("x", t, ["b", "s", hidden]), helper.make_tensor_value_info("w", t, [hidden])],
        [helper.make_tensor_value_info("y", t, ["b", "s", hidden])],
        "RMSNorm",
    )
    g = torch.Generator().manual_seed(1)
    # large activations: x^2 overflows fp16 (max 65504) unless the statistics are fp32
    x = (torch.randn(2, 4, hidden, generator=g) * 300).to(dtype)
    x[0, 0] *= 1e-3  # and a small row where epsilon matters
    w = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype)
    got = sess.run(None, {"x": x.numpy(), "w": w.numpy()})[0]
    assert np.isfinite(got).all()
    assert_close(got, rms_norm(x, w, epsilon))


def test_schema_registration_is_idempotent_and_onnx_reference_still_imports():
    import subprocess
    import sys

    register_all_schemas()
    register_all_schemas()
    for s in all_specs():
        schema = onnx.defs.get_schema(s.op_type, s.version, s.domain)
        assert set(schema.attributes) == set(s.attributes)
    # Registering llama_trt.RotaryEmbedding must not break a later `import onnx.reference`
    # (it refuses op names that exist in two domains if it builds its table after us).
    code = ("from llama_trt.plugins.onnx_support import register_all_schemas; register_all_schemas(); "
            "import onnx.reference, onnxscript; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-1500:]
