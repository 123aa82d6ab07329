"""RMSNorm as an ONNX node ``llama_trt::RMSNorm`` with a reference function body.

Node: ``Y = RMSNorm(X, weight; epsilon: float)``; X [..., hidden] in float / float16 /
bfloat16, weight [hidden]. The body follows :func:`..op.rms_norm_reference` step by step:
Cast X to float32, X*X, ReduceMean over the last axis (keepdims), + epsilon, Sqrt,
Reciprocal, Mul, cast back to X's dtype, then multiply by the weight (cast to X's dtype).
"""

from __future__ import annotations

from .op import SPEC

DEFAULT_EPSILON = 1e-5


def schema():
    from onnx import defs, helper

    S = defs.OpSchema
    return S(
        SPEC.op_type,
        SPEC.domain,
        SPEC.version,
        "RMS normalisation over the last axis (statistics in float32), times weight.",
        inputs=[
            S.FormalParameter("X", "T", "input [..., hidden]"),
            S.FormalParameter("weight", "W", "scale [hidden]"),
        ],
        outputs=[S.FormalParameter("Y", "T", "normalised X, same shape and dtype")],
        type_constraints=[
            ("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "activation type"),
            ("W", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "weight type"),
        ],
        attributes=[S.Attribute("epsilon", helper.make_attribute("epsilon", DEFAULT_EPSILON), "added to the mean square")],
    )


def function_proto(opset: int = 23):
    import onnx
    from onnx import TensorProto, helper

    from ..onnx_support import node_with_ref

    nodes = [
        helper.make_node("Cast", ["X"], ["xf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["xf", "xf"], ["sq"]),
        helper.make_node("Constant", [], ["axes"], value=helper.make_tensor("axes", TensorProto.INT64, [1], [-1])),
        helper.make_node("ReduceMean", ["sq", "axes"], ["mean"], keepdims=1),
        node_with_ref("Constant", [], ["eps"], value_float=("epsilon", onnx.AttributeProto.FLOAT)),
        helper.make_node("Add", ["mean", "eps"], ["var_eps"]),
        helper.make_node("Sqrt", ["var_eps"], ["rms"]),
        helper.make_node("Reciprocal", ["rms"], ["inv_rms"]),
        helper.make_node("Mul", ["xf", "inv_rms"], ["yf"]),
        helper.make_node("CastLike", ["yf", "X"], ["y"]),
        helper.make_node("CastLike", ["weight", "X"], ["w"]),
        helper.make_node("Mul", ["w", "y"], ["Y"]),
    ]
    return helper.make_function(
        SPEC.domain,
        SPEC.op_type,
        ["X", "weight"],
        ["Y"],
        nodes,
        [helper.make_opsetid("", opset)],
        attribute_protos=[helper.make_attribute("epsilon", DEFAULT_EPSILON)],
        doc_string=__doc__,
    )


def torch_op():
    import torch

    from . import op  # noqa: F401  (registers the custom op)

    return torch.ops.llama_trt.rms_norm.default


def translation(x, weight, epsilon: float):
    """torch ``llama_trt::rms_norm`` -> one ``llama_trt.RMSNorm`` node."""
    from ..onnx_support import custom_opset

    return custom_opset(SPEC.version).RMSNorm(x, weight, epsilon=float(epsilon))
