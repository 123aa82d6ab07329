"""RoPE as an ONNX node ``llama_trt::RotaryEmbedding`` with a reference function body.

Node: ``Y = RotaryEmbedding(X, position_ids, inv_freq; interleaved: int, rotary_dim: int)``
with X [batch, heads, seq, head_dim] (float / float16 / bfloat16), position_ids int64
[batch, seq], inv_freq float32 [rotary_dim / 2] (rope scaling already applied).

The body follows :func:`..op.rope_reference`: angles = float(position_ids)[..., None] *
inv_freq in float32, Cos / Sin in float32, cast to X's dtype, unsqueezed on the head
axis. The first ``rotary_dim`` channels rotate, the rest pass through. ``interleaved``
selects the pairing through an ``If``: 0 pairs (i, i + rotary_dim/2) (HF rotate_half),
1 pairs (2i, 2i+1) (Meta, llama2.c). Both attributes are attribute references in the
body, so changing them on a node changes what the node computes.
"""

from __future__ import annotations

from .op import SPEC


def schema():
    from onnx import defs, helper

    S = defs.OpSchema
    return S(
        SPEC.op_type,
        SPEC.domain,
        SPEC.version,
        "Rotary position embedding of the first rotary_dim channels of X.",
        inputs=[
            S.FormalParameter("X", "T", "queries or keys [batch, heads, seq, head_dim]"),
            S.FormalParameter("position_ids", "tensor(int64)", "positions [batch, seq]"),
            S.FormalParameter("inv_freq", "tensor(float)", "inverse frequencies [rotary_dim / 2]"),
        ],
        outputs=[S.FormalParameter("Y", "T", "rotated X, same shape and dtype")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "activation type")],
        attributes=[
            S.Attribute("interleaved", helper.make_attribute("interleaved", 0), "1: pairs (2i, 2i+1); 0: pairs (i, i + rotary_dim/2)"),
            S.Attribute("rotary_dim", S.AttrType.INT, "number of leading channels that rotate", required=True),
        ],
    )


def _rotate(prefix: str, a: str, b: str, out: str):
    """Nodes for (a*cos - b*sin, b*cos + a*sin) -> names ``out_first``, ``out_second``."""
    from onnx import helper

    p = prefix
    return [
        helper.make_node("Mul", [a, "cos"], [f"{p}a_cos"]),
        helper.make_node("Mul", [b, "sin"], [f"{p}b_sin"]),
        helper.make_node("Sub", [f"{p}a_cos", f"{p}b_sin"], [f"{out}_first"]),
        helper.make_node("Mul", [b, "cos"], [f"{p}b_cos"]),
        helper.make_node("Mul", [a, "sin"], [f"{p}a_sin"]),
        helper.make_node("Add", [f"{p}b_cos", f"{p}a_sin"], [f"{out}_second"]),
    ]


def _untyped_output(name: str):
    import onnx

    vi = onnx.ValueInfoProto()
    vi.name = name
    return vi


def function_proto(opset: int = 23):
    import onnx
    from onnx import TensorProto, helper

    from ..onnx_support import node_with_ref

    INT = onnx.AttributeProto.INT

    def const(name, values):
        return helper.make_node(
            "Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [len(values)], values)
        )

    # Half pairing: a = rot[..., :half], b = rot[..., half:].
    half_branch = helper.make_graph(
        [
            helper.make_node("Slice", ["rot", "zero_1d", "half_1d", "minus1_1d"], ["h_a"]),
            helper.make_node("Slice", ["rot", "half_1d", "rd_1d", "minus1_1d"], ["h_b"]),
            *_rotate("h_", "h_a", "h_b", "h_out"),
            helper.make_node("Concat", ["h_out_first", "h_out_second"], ["half_rot_out"], axis=-1),
        ],
        "rotate_half_pairs",
        [],
        [_untyped_output("half_rot_out")],
    )
    # Interleaved pairing: view rot as [..., rotary_dim/2, 2]; a = [..., 0], b = [..., 1].
    interleaved_branch = helper.make_graph(
        [
            helper.make_node("Shape", ["rot"], ["i_lead"], end=-1),
            helper.make_node("Concat", ["i_lead", "half_1d", "two_1d"], ["i_pairs_shape"], axis=0),
            helper.make_node("Reshape", ["rot", "i_pairs_shape"], ["i_pairs"]),
            helper.make_node("Gather", ["i_pairs", "zero_0d"], ["i_a"], axis=-1),
            helper.make_node("Gather", ["i_pairs", "one_0d"], ["i_b"], axis=-1),
            *_rotate("i_", "i_a", "i_b", "i_out"),
            helper.make_node("Unsqueeze", ["i_out_first", "minus1_1d"], ["i_first_u"]),
            helper.make_node("Unsqueeze", ["i_out_second", "minus1_1d"], ["i_second_u"]),
            helper.make_node("Concat", ["i_first_u", "i_second_u"], ["i_stacked"], axis=-1),
            helper.make_node("Shape", ["rot"], ["i_rot_shape"]),
            helper.make_node("Reshape", ["i_stacked", "i_rot_shape"], ["interleaved_rot_out"]),
        ],
        "rotate_interleaved_pairs",
        [],
        [_untyped_output("interleaved_rot_out")],
    )

    nodes = [
        # Attribute-driven scalars.
        node_with_ref("Constant", [], ["rd_0d"], value_int=("rotary_dim", INT)),
        node_with_ref("Constant", [], ["interleaved_0d"], value_int=("interleaved", INT)),
        const("zero_1d", [0]),
        const("minus1_1d", [-1]),
        const("two_1d", [2]),
        const("int64_max_1d", [2**63 - 1]),
        helper.make_node("Constant", [], ["zero_0d"], value=helper.make_tensor("z", TensorProto.INT64, [], [0])),
        helper.make_node("Constant", [], ["one_0d"], value=helper.make_tensor("o", TensorProto.INT64, [], [1])),
        helper.make_node("Constant", [], ["two_0d"], value=helper.make_tensor("t", TensorProto.INT64, [], [2])),
        helper.make_node("Unsqueeze", ["rd_0d", "zero_1d"], ["rd_1d"]),
        helper.make_node("Div", ["rd_1d", "two_0d"], ["half_1d"]),
        # cos / sin: float32 angles, cast to X's dtype, [batch, 1, seq, rotary_dim/2].
        helper.make_node("Cast", ["position_ids"], ["pos_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["pos_f", "minus1_1d"], ["pos_f_u"]),
        helper.make_node("Cast", ["inv_freq"], ["inv_freq_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["pos_f_u", "inv_freq_f"], ["angles"]),
        helper.make_node("Cos", ["angles"], ["cos_f"]),
        helper.make_node("Sin", ["angles"], ["sin_f"]),
        helper.make_node("CastLike", ["cos_f", "X"], ["cos_x"]),
        helper.make_node("CastLike", ["sin_f", "X"], ["sin_x"]),
        helper.make_node("Unsqueeze", ["cos_x", "one_1d"], ["cos"]),
        helper.make_node("Unsqueeze", ["sin_x", "one_1d"], ["sin"]),
        # Rotated part and pass-through part.
        helper.make_node("Slice", ["X", "zero_1d", "rd_1d", "minus1_1d"], ["rot"]),
        helper.make_node("Slice", ["X", "rd_1d", "int64_max_1d", "minus1_1d"], ["rest"]),
        helper.make_node("Cast", ["interleaved_0d"], ["is_interleaved"], to=TensorProto.BOOL),
        helper.make_node(
            "If", ["is_interleaved"], ["rot_out"],
            then_branch=interleaved_branch, else_branch=half_branch,
        ),
        helper.make_node("Concat", ["rot_out", "rest"], ["Y"], axis=-1),
    ]
    nodes.insert(6, const("one_1d", [1]))
    return helper.make_function(
        SPEC.domain,
        SPEC.op_type,
        ["X", "position_ids", "inv_freq"],
        ["Y"],
        nodes,
        [helper.make_opsetid("", opset)],
        attributes=["rotary_dim"],
        attribute_protos=[helper.make_attribute("interleaved", 0)],
        doc_string=__doc__,
    )


def torch_op():
    import torch

    from . import op  # noqa: F401  (registers the custom op)

    return torch.ops.llama_trt.rope.default


def translation(x, position_ids, inv_freq, interleaved: bool, rotary_dim: int):
    """torch ``llama_trt::rope`` -> one ``llama_trt.RotaryEmbedding`` node."""
    from ..onnx_support import custom_opset

    return custom_opset(SPEC.version).RotaryEmbedding(
        x, position_ids, inv_freq, interleaved=int(bool(interleaved)), rotary_dim=int(rotary_dim)
    )
