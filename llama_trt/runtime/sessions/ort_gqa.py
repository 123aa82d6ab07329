"""Attention on a KV cache ONNX Runtime updates in place: ``com.microsoft.GroupQueryAttention``.

After :mod:`.ort_lowering` each layer runs ``Split(packed q|k|v)``, two opset-23
``RotaryEmbedding`` nodes and one opset-23 ``Attention`` that concatenates the whole past into a
new ``present`` every step. :func:`attention_to_gqa` replaces those four nodes with one
``GroupQueryAttention`` (``do_rotary=1``: RoPE inside, from the same cos/sin caches and
``position_ids``; the packed q|k|v as its only projection input; the export's additive mask as
``attention_bias``), and marks the graph (:data:`KV_LAYOUT_KEY` = :data:`SHARED`): the session
then binds ``past_key_values.i.*`` and ``present.i.*`` to one buffer per layer of the cache's
full capacity, and the kernel writes each step's keys and values into it where they belong
(``seqlens_k`` = past + seq - 1 for every row; ``total_sequence_length`` = past + seq, both
from the mask's width). Nothing is copied per step and nothing is rebound but the step's ids,
mask, positions and logits.

What the session must do for this graph (ONNX Runtime 1.32 CPU, measured in the tests):

* in a first prompt (past = 0) the kernel rotates token ``t`` of every row by
  ``position_ids[0, 0] + t``, whatever the rows' own positions say (decode steps and later
  chunks honour every row's and token's). The session feeds ``arange(seq)`` then and keeps,
  per row, the constant by which those positions exceed the real ones; every later step adds
  it. RoPE attention depends on position differences only, so the logits are the same.
* a step with past > 0, more than one row and more than one token is refused by the kernel
  ("batch_size must be 1"): the session runs it one row at a time on views of the cache.
* ``head_dim`` must be a multiple of 16 and the rotary dimension the whole head: otherwise the
  graph keeps its ``Attention`` nodes (and the session its copying cache).
"""

from __future__ import annotations

import numpy as np

from .ort_graph import _splice, use_ms_domain

KV_LAYOUT_KEY = "llama_trt.ort_kv_layout"
SHARED = "shared-buffer"
_SEQLENS, _TOTAL = "llama_trt.gqa.seqlens_k", "llama_trt.gqa.total_sequence_length"


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _plan(att, producer, consumers, head_dim: int):
    """(packed q|k|v, rope node of q, the nodes replaced) for one Attention node, or why not."""
    if len(att.input) < 6 or not att.input[3]:
        return "no mask / past inputs"
    rq, rk = producer.get(att.input[0]), producer.get(att.input[1])
    if rq is None or rk is None or rq.op_type != "RotaryEmbedding" or rk.op_type != "RotaryEmbedding":
        return "q or k does not come from a RotaryEmbedding"
    if list(rq.input[1:]) != list(rk.input[1:]) or _attrs(rq).get("interleaved", 0) != _attrs(rk).get("interleaved", 0):
        return "q and k are rotated differently"
    if int(_attrs(rq).get("rotary_embedding_dim", 0) or head_dim) != head_dim:
        return "partial rotary dimension"
    split = producer.get(rq.input[0])
    if split is None or split.op_type != "Split" or list(split.output) != [rq.input[0], rk.input[0], att.input[2]]:
        return "q, k, v are not the three outputs of one packed projection"
    for name in split.output:
        if len(consumers.get(name, [])) != 1:
            return f"{name} has other readers"
    for node in (rq, rk):
        if len(consumers.get(node.output[0], [])) != 1:
            return f"{node.output[0]} has other readers"
    return split.input[0], rq, (split, rq, rk)


def _length_nodes(model) -> list:
    """``seqlens_k`` [batch] int32 = mask width - 1 and ``total_sequence_length`` (scalar int32)."""
    from onnx import TensorProto, helper, numpy_helper

    one = "llama_trt.gqa.one"
    model.graph.initializer.append(numpy_helper.from_array(np.array([1], np.int32), one))
    return [
        helper.make_node("Shape", ["attention_mask"], ["llama_trt.gqa.width64"], start=1, end=2),
        helper.make_node("Cast", ["llama_trt.gqa.width64"], ["llama_trt.gqa.width"], to=TensorProto.INT32),
        helper.make_node("Squeeze", ["llama_trt.gqa.width"], [_TOTAL]),
        helper.make_node("Shape", ["input_ids"], ["llama_trt.gqa.batch"], start=0, end=1),
        helper.make_node("Sub", ["llama_trt.gqa.width", one], ["llama_trt.gqa.last"]),
        helper.make_node("Expand", ["llama_trt.gqa.last", "llama_trt.gqa.batch"], [_SEQLENS]),
    ]


def attention_to_gqa(model, head_dim: int | None) -> tuple[int, str | None]:
    """Rewrite every opset-23 Attention block to GroupQueryAttention, or none of them.

    Returns ``(blocks rewritten, why not)``; on success the graph carries :data:`KV_LAYOUT_KEY`."""
    from onnx import helper

    g = model.graph
    if not head_dim or head_dim % 16:
        return 0, f"head_dim {head_dim} is not a multiple of 16 (GroupQueryAttention's CPU kernel)"
    names = {i.name for i in g.input}
    if not {"attention_mask", "input_ids"} <= names:
        return 0, "no attention_mask / input_ids inputs"
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    atts = [n for n in g.node if n.op_type == "Attention" and n.domain in ("", "ai.onnx")]
    if not atts:
        return 0, "no Attention nodes"
    plans = {}
    for att in atts:
        plan = _plan(att, producer, consumers, head_dim)
        if isinstance(plan, str):
            return 0, f"{att.name or att.output[0]}: {plan}"
        plans[id(att)] = plan
    replace, drop = {}, set()
    for att in atts:
        packed, rope, gone = plans[id(att)]
        a = _attrs(att)
        gqa = helper.make_node(
            "GroupQueryAttention",
            [packed, "", "", att.input[4], att.input[5], _SEQLENS, _TOTAL, rope.input[1], rope.input[2], rope.input[3],
             att.input[3]],
            list(att.output), name=(att.name or att.output[0]) + ".gqa", domain="com.microsoft",
            num_heads=int(a["q_num_heads"]), kv_num_heads=int(a["kv_num_heads"]), scale=float(a.get("scale", 0.0)),
            do_rotary=1, rotary_interleaved=int(_attrs(rope).get("interleaved", 0)))
        replace[id(att)] = [gqa]
        drop.update(id(n) for n in gone)
    _splice(g, replace, drop)
    for k, n in enumerate(_length_nodes(model)):  # read graph inputs only: first is always in order
        g.node.insert(k, n)
    use_ms_domain(model)
    meta = {p.key: p for p in model.metadata_props}
    if KV_LAYOUT_KEY in meta:
        meta[KV_LAYOUT_KEY].value = SHARED
    else:
        model.metadata_props.add(key=KV_LAYOUT_KEY, value=SHARED)
    return len(atts), None


def kv_layout(model) -> str:
    """:data:`SHARED` for a graph :func:`attention_to_gqa` rewrote, else ``"concat"``."""
    for p in model.metadata_props:
        if p.key == KV_LAYOUT_KEY:
            return p.value
    return "concat"


__all__ = ["KV_LAYOUT_KEY", "SHARED", "attention_to_gqa", "kv_layout"]
