"""The ONNX form of int4 / int8 exports, checked against the ONNX spec and by ONNX's own tools.

Expected values come from the spec (DequantizeLinear-21+ blocked quantization: the scale has
the input's rank, ``scale.shape[axis] = x.shape[axis] / block_size``; int4 holds [-8, 7],
uint4 [0, 15]) and from onnx.reference's DequantizeLinear, not from the code under test.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _load(folder):
    from llama_trt.plugins.onnx_support import register_all_schemas

    register_all_schemas()
    onnx.checker.check_model(str(folder / "model.onnx"), full_check=True)
    return onnx.load(str(folder / "model.onnx"))


def _weight_dqs(model):
    inits = {i.name: i for i in model.graph.initializer}
    readers = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    out = {}
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            out[n.input[0].removesuffix(".weight_t_quantized")] = (n, attrs, inits, readers.get(n.output[0], []))
    return out


@pytest.mark.parametrize("group", [32, 64])
def test_int4_blocked_dq_follows_the_spec(quantized, group):
    folder, manifest = quantized("int4-rtn", group_size=group)
    model = _load(folder)
    dqs = _weight_dqs(model)
    k_of = {"down_proj": 96}
    seen4 = seen8 = 0
    for layer in range(2):
        for leaf in LINEARS:
            name = f"model.layers.{layer}.{'mlp' if leaf in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}.{leaf}"
            node, attrs, inits, readers = dqs[name]
            q, scale = inits[node.input[0]], inits[node.input[1]]
            k = k_of.get(leaf, 64)
            assert [r.op_type for r in readers] == ["MatMul"] and readers[0].input[1] == node.output[0]
            if k % group == 0:  # int4, blocks along K (axis 0), symmetric: no zero point input
                seen4 += 1
                assert q.data_type == TensorProto.INT4 and attrs == {"axis": 0, "block_size": group}
                assert list(scale.dims) == [k // group, q.dims[1]] and scale.data_type == TensorProto.FLOAT
                assert len(node.input) == 2
                vals = numpy_helper.to_array(q).astype(np.int8)
                assert vals.min() >= -8 and vals.max() <= 7
            else:  # 96 % 64: per-channel int8 fallback, listed in the manifest
                seen8 += 1
                assert q.data_type == TensorProto.INT8 and attrs == {"axis": 1}
                assert name in [e["name"] for e in manifest.quantization["int8_fallback"]]
    assert seen4 == (14 if group == 32 else 12) and seen8 == 14 - seen4
    q = manifest.quantization
    assert manifest.dtype == "int4" and q["scheme"] == "int4-rtn" and q["group_size"] == group
    assert q["spec"]["tensorrt"] is True and q["weight_bytes"]["int4"] > 0


def test_zero_point_variant_is_uint4_and_flagged_for_tensorrt(quantized):
    folder, manifest = quantized("int4-rtn", group_size=32, int4_zero_point=True)
    dqs = _weight_dqs(_load(folder))
    node, attrs, inits, _ = dqs["model.layers.0.self_attn.q_proj"]
    q, scale, zp = (inits[i] for i in node.input)
    assert q.data_type == zp.data_type == TensorProto.UINT4
    assert list(zp.dims) == list(scale.dims) == [2, q.dims[1]]
    assert manifest.quantization["spec"]["tensorrt"] is False
    assert "zero point" in manifest.quantization["spec"]["tensorrt_note"]


def _big_float_matrices(model, vocab, hidden):
    return [i for i in model.graph.initializer if sorted(i.dims) == sorted([vocab, hidden])]


@pytest.mark.parametrize("scheme", ["int8-weight", "int4-rtn"])
def test_tied_embedding_is_stored_once(quantized, tied_fp32, scheme):
    """Default head: int8 in blocks (embedding rows gathered from its integers); --quantize-lm-head:
    the scheme's own bits; --no-quantize-lm-head: float (the fp16-stored table, Cast, read through a
    Transpose). One matrix of the table's size either way."""
    int4 = scheme.startswith("int4")
    kw = {"group_size": 32} if int4 else {}
    base = _big_float_matrices(onnx.load(str(tied_fp32 / "model.onnx")), 128, 64)
    assert len(base) == 2  # the fp32 export holds the table and its constant-folded transpose
    for opt, dtype in ((None, TensorProto.INT8), (True, TensorProto.INT4 if int4 else TensorProto.INT8),
                       (False, TensorProto.FLOAT16)):
        folder, manifest = quantized(scheme, quantize_lm_head=opt, **kw)
        model = _load(folder)
        mats = _big_float_matrices(model, 128, 64)
        assert len(mats) == 1 and mats[0].data_type == dtype, (opt, [(m.name, m.data_type) for m in mats])
        gather = next(n for n in model.graph.node if n.op_type == "Gather" and "input_ids" in n.input)
        assert gather.input[0] in (mats[0].name, f"{mats[0].name}_fp32") or \
            gather.input[0].endswith("_DequantizeLinear_Output")
        assert ("lm_head" in manifest.quantization["quantized"]) == (dtype != TensorProto.FLOAT16)


@pytest.mark.parametrize("scheme, kw", [("int8-weight", {}), ("int4-rtn", {"group_size": 32})])
def test_int8_head_is_blocked_along_k(quantized, tied_ckpt, scheme, kw):
    """An int8 lm head (the weight-only schemes' default) keeps a symmetric scale per
    32 rows of K (DequantizeLinear-21 blocked form: scale [K/32, V], axis 0, no zero point), each
    the block's max |w| / 127 of the checkpoint's head (the tied table, transposed)."""
    from llama_trt.checkpoint import load_checkpoint

    folder, manifest = quantized(scheme, **kw)
    model = _load(folder)
    node, attrs, inits, readers = next(v for v in _weight_dqs(model).values() if v[1].get("block_size") == 32
                                       and numpy_helper.to_array(v[2][v[0].input[0]]).dtype == np.int8)
    q, scale = (numpy_helper.to_array(inits[i]) for i in node.input)
    assert attrs == {"axis": 0, "block_size": 32} and len(node.input) == 2
    assert q.shape == (64, 128) and scale.shape == (2, 128) and np.abs(q).max() <= 127
    head = load_checkpoint(tied_ckpt).state_dict["model.embed_tokens.weight"].float().numpy().T  # [H, V]
    np.testing.assert_allclose(scale, np.abs(head.reshape(2, 32, 128)).max(1) / 127, rtol=1e-6)
    assert [r.op_type for r in readers].count("MatMul") == 1
    assert manifest.quantization["lm_head"] == "int8" and manifest.quantization["lm_head_block_size"] == 32


def test_dq_reference_equals_numpy_and_torch_fake_quant():
    """onnx.reference's DequantizeLinear (the spec) == our numpy dequantize == the torch fake-quant
    the AWQ search optimizes, for symmetric and zero-point int4 and per-channel int8."""
    import torch
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    from llama_trt.quantize.awq import fake_quant
    from llama_trt.quantize.weights import dequantize, int8_weight, quantize_blocked, to_tensors

    w = np.random.default_rng(0).normal(size=(128, 48)).astype(np.float32)
    w[:32, 5] = 0.0  # an all-zero block
    clip = np.abs(w.reshape(4, 32, 48)).max(1) * 0.8
    cases = [(quantize_blocked(w, 32), None), (quantize_blocked(w, 32, symmetric=False), None),
             (quantize_blocked(w, 32, clip=clip), clip), (int8_weight(w), None)]
    for qw, c in cases:
        tensors = to_tensors(qw, "w")
        attrs = {"axis": qw.axis, **({"block_size": qw.block_size} if qw.block_size else {})}
        node = helper.make_node("DequantizeLinear", [t.name for t in tensors], ["y"], **attrs)
        graph = helper.make_graph([node], "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                                  tensors)
        spec = ReferenceEvaluator(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])).run(None, {})[0]
        np.testing.assert_array_equal(dequantize(qw), spec)
        if qw.block_size:
            tq = fake_quant(torch.from_numpy(w), 32, qw.dtype == "int4", None if c is None else torch.from_numpy(c))
            np.testing.assert_allclose(tq.numpy(), spec, rtol=0, atol=1e-6)
    # error bound of round-to-nearest: half a step per element
    qw = quantize_blocked(w, 32)
    assert np.all(np.abs(dequantize(qw) - w) <= np.repeat(qw.scale, 32, axis=0) / 2 + 1e-7)
