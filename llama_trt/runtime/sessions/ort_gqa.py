"""Attention on a KV cache ONNX Runtime updates in place: ``com.microsoft.GroupQueryAttention``.

After :mod:`.ort_lowering` each layer runs ``Split(packed q|k|v)``, two opset-23
``RotaryEmbedding`` nodes and one opset-23 ``Attention`` that concatenates the whole past into a
new ``present`` every step. :func:`attention_to_gqa` replaces those four nodes with one
``GroupQueryAttention`` (``do_rotary=1``: RoPE inside, from the same cos/sin caches and
``position_ids``; the packed q|k|v as its only projection input), and marks the graph
(:data:`KV_LAYOUT_KEY` = :data:`SHARED`): the session then binds ``past_key_values.i.*`` and
``present.i.*`` to one buffer per layer of the cache's full capacity, and the kernel writes each
step's keys and values into it where they belong. The kernel applies causality itself, so the
export's mask subgraph (~20 small nodes run every step) goes too: the session feeds the padding
bias (:data:`ATTENTION_BIAS`: 0 where ``attention_mask`` is 1, the export's fill elsewhere),
``seqlens_k`` = past + seq - 1 for every row and ``total_sequence_length`` = past + seq, and
``attention_mask`` leaves the graph. Nothing is copied per step and nothing is rebound but the
step's ids, positions, these three and the logits.

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
FILL_KEY = "llama_trt.ort_attention_fill"
SHARED = "shared-buffer"
# graph inputs the session feeds instead of attention_mask: the padding bias (0 attended, the
# export's fill elsewhere; causality is the kernel's own), past + seq - 1 per row, past + seq
ATTENTION_BIAS = "llama_trt.attention_bias"
SEQLENS_K = "llama_trt.seqlens_k"
TOTAL_LENGTH = "llama_trt.total_sequence_length"


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


def _bias_fill(att, producer, consts) -> np.ndarray | None:
    """The export's mask fill value (in Q's type) behind the Attention node's additive bias."""
    where = producer.get(att.input[3])
    if where is None or where.op_type != "Where" or where.input[2] not in consts:
        return None
    fill = np.asarray(consts[where.input[2]]())
    return fill.reshape(()) if fill.size == 1 else None


def _session_inputs(model, dtype: int) -> None:
    """The attention inputs the session computes from the mask (see :mod:`.ort_shared_kv`)."""
    from onnx import TensorProto, helper

    model.graph.input.extend([
        helper.make_tensor_value_info(ATTENTION_BIAS, dtype, ["batch", 1, "seq", "total"]),
        helper.make_tensor_value_info(SEQLENS_K, TensorProto.INT32, ["batch"]),
        helper.make_tensor_value_info(TOTAL_LENGTH, TensorProto.INT32, []),
    ])


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
    from ...trt_engines.lowering import _constant_values

    consts = _constant_values(g)
    plans, fills = {}, set()
    for att in atts:
        plan = _plan(att, producer, consumers, head_dim)
        fill = _bias_fill(att, producer, consts)
        if isinstance(plan, str) or fill is None:
            return 0, f"{att.name or att.output[0]}: {plan if isinstance(plan, str) else 'mask is not Where(cond, 0, fill)'}"
        plans[id(att)] = plan
        fills.add((fill.dtype.str, float(fill)))
    if len(fills) != 1:
        return 0, f"attention blocks use different mask fills {sorted(fills)}"
    replace, drop = {}, set()
    for att in atts:
        packed, rope, gone = plans[id(att)]
        a = _attrs(att)
        gqa = helper.make_node(
            "GroupQueryAttention",
            [packed, "", "", att.input[4], att.input[5], SEQLENS_K, TOTAL_LENGTH, rope.input[1], rope.input[2],
             rope.input[3], ATTENTION_BIAS],
            list(att.output), name=(att.name or att.output[0]) + ".gqa", domain="com.microsoft",
            num_heads=int(a["q_num_heads"]), kv_num_heads=int(a["kv_num_heads"]), scale=float(a.get("scale", 0.0)),
            do_rotary=1, rotary_interleaved=int(_attrs(rope).get("interleaved", 0)))
        replace[id(att)] = [gqa]
        drop.update(id(n) for n in gone)
    _splice(g, replace, drop)
    from onnx import helper as _h

    (dtype_str, fill), = fills
    _session_inputs(model, _h.np_dtype_to_tensor_dtype(np.dtype(dtype_str)))
    use_ms_domain(model)
    meta = {p.key: p for p in model.metadata_props}
    for key, value in ((KV_LAYOUT_KEY, SHARED), (FILL_KEY, repr(fill))):
        if key in meta:
            meta[key].value = value
        else:
            model.metadata_props.add(key=key, value=value)
    return len(atts), None


def kv_layout(model) -> str:
    """:data:`SHARED` for a graph :func:`attention_to_gqa` rewrote, else ``"concat"``."""
    for p in model.metadata_props:
        if p.key == KV_LAYOUT_KEY:
            return p.value
    return "concat"


def attention_fill(model) -> float | None:
    """The mask fill value the session puts in :data:`ATTENTION_BIAS` (None: not a GQA graph)."""
    for p in model.metadata_props:
        if p.key == FILL_KEY:
            return float(p.value)
    return None


__all__ = ["ATTENTION_BIAS", "FILL_KEY", "KV_LAYOUT_KEY", "SEQLENS_K", "SHARED", "TOTAL_LENGTH", "attention_fill",
           "attention_to_gqa", "kv_layout"]
