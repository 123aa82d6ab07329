"""The exported attention block -> one opset-23 ``Attention`` node (ONNX Runtime sessions).

Each exported layer computes attention as Concat(past, new) / Unsqueeze / Expand / Reshape (the
GQA expand of the whole cache) / Transpose / MatMul / Mul / Where(mask) / Softmax / MatMul.
:func:`fuse_attention` matches that chain from its Softmax and replaces it with ``Attention``
(GQA via ``q_num_heads`` / ``kv_num_heads``, past/present KV, the same additive mask the export
computes: 0 where attended, the export's fill value elsewhere), which writes ``present.*``
itself, so the IO contract is unchanged. :func:`attention_3d` then feeds it Q/K/V as
[batch, seq, heads*head_dim] (RoPE with ``num_heads``), dropping the per-head
Reshape/Transpose copies. A block that does not match is left as it is, with the reason.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .ort_graph import _attr, _Graph, _splice


def _fuse_attention(model, report) -> None:
    """Rewrite every matching attention block (``report``: an OrtLoweringReport, counts and notes)."""
    from onnx import helper, numpy_helper

    g = model.graph
    G = _Graph(g)
    graph_inputs = {i.name for i in g.input}
    graph_outputs = {o.name for o in g.output}
    kv_shape = {}
    for vi in g.input:
        if vi.name.startswith("past_key_values.") and vi.type.HasField("tensor_type"):
            kv_shape[vi.name] = [d.dim_value or None for d in vi.type.tensor_type.shape.dim]
    biases: dict[tuple, str] = {}
    bias_before: dict[int, tuple] = {}  # id(first Where using the mask) -> (Where(mask, 0, fill) bias, that Where)
    replace: dict[int, Any] = {}      # id(MatMul(probs, V)) -> Attention node (same position)
    remove: set[int] = set()
    for sm in list(g.node):
        if sm.op_type != "Softmax" or sm.domain not in ("", "ai.onnx"):
            continue
        report.attention_blocks += 1
        why = _match_one(G, sm, graph_inputs, graph_outputs, kv_shape)
        if isinstance(why, str):
            report.notes.append(f"attention at {sm.name or sm.output[0]!r} kept: {why}")
            continue
        m = why
        fill = m["fill_value"]
        key = (m["cond"], fill.dtype.str, float(fill))
        if key not in biases:
            name = f"llama_trt.ort_attention_bias.{len(biases)}"
            zero, fill_name = f"{name}.zero", f"{name}.fill"
            g.initializer.extend([numpy_helper.from_array(np.zeros((), dtype=fill.dtype), zero),
                                  numpy_helper.from_array(fill, fill_name)])
            bias_node = helper.make_node("Where", [m["cond"], zero, fill_name], [name], name=name)
            biases[key] = name
            bias_before[id(m["where"])] = (bias_node, m["where"])
        att = helper.make_node(
            "Attention", [m["q"], m["k_new"], m["v_new"], biases[key], m["past_k"], m["past_v"]],
            [m["out"], m["present_k"], m["present_v"]], name=f"llama_trt.ort_attention.{report.attention}",
            q_num_heads=m["q_heads"], kv_num_heads=m["kv_heads"], scale=m["scale"],
        )
        replace[id(m["last"])] = att
        remove.update(id(n) for n in (m["concat_k"], m["concat_v"], m["last"]))
        report.attention += 1
    if not report.attention:
        return
    # every input of an Attention node is produced before the MatMul it replaces, and the bias
    # goes right before the first Where that read the same mask, so the order stays topological
    splice = {where: [bias, where_node] for where, (bias, where_node) in bias_before.items()}
    splice.update({last: [att] for last, att in replace.items()})
    _splice(g, splice, remove)


def _match_one(G: _Graph, sm, graph_inputs, graph_outputs, kv_shape):
    """The pieces of one exported attention block ending at Softmax ``sm``, or why it does not match."""
    from onnx import TensorProto, helper

    axis = _attr(sm, "axis", -1)
    if axis != -1 and axis != 3:
        return f"softmax axis {axis}"
    where = G.prod(sm.input[0], "Where")
    if where is None:
        return "softmax input is not Where(mask, scores, fill)"
    cond, scaled, fill = where.input
    fill_value = G.const(fill)
    if fill_value is None or fill_value.size != 1:
        return "mask fill is not a scalar constant"
    # fp16 exports: scores Cast to float32 before the mask/softmax, probabilities Cast back
    up = G.prod(scaled, "Cast")
    if up is not None:
        if _attr(up, "to") != TensorProto.FLOAT:
            return "scores Cast to a type other than float32"
        scaled = up.input[0]
    mul = G.prod(scaled, "Mul")
    if mul is None:
        return "scores are not Mul(QK, scale)"
    scale = G.const(mul.input[1])
    qk_name = mul.input[0]
    if scale is None:
        scale, qk_name = G.const(mul.input[0]), mul.input[1]
    if scale is None or scale.size != 1:
        return "scale is not a scalar constant"
    qk = G.prod(qk_name, "MatMul")
    if qk is None:
        return "scores are not MatMul(Q, K^T)"
    q, kt = qk.input
    tr = G.prod(kt, "Transpose")
    if tr is None or list(_attr(tr, "perm", [])) != [0, 1, 3, 2]:
        return "K^T is not Transpose(perm=[0,1,3,2])"
    concat_k = _expanded_kv(G, tr.input[0])
    if concat_k is None:
        return "K is not the expanded present key"
    # single consumer chain: the Softmax output feeds one MatMul with the expanded V
    probs = sm.output[0]
    users = G.consumers.get(probs, [])
    down = users[0] if len(users) == 1 and users[0].op_type == "Cast" else None
    if down is not None:
        probs = down.output[0]
        users = G.consumers.get(probs, [])
    if len(users) != 1 or users[0].op_type != "MatMul" or users[0].input[0] != probs:
        return "softmax output is not consumed by one MatMul(probs, V)"
    last = users[0]
    act = np.dtype(scale.dtype)  # Q/K/V's type (the scale constant is in the activation dtype)
    if down is not None and helper.tensor_dtype_to_np_dtype(_attr(down, "to")) != act:
        return "probabilities are cast to a type other than Q's"
    if up is None and np.dtype(fill_value.dtype) != act:
        return "mask fill type differs from the scores' type"
    # the additive mask in Q's type: the fill, clamped to the type's finite range
    info = np.finfo(act)
    fill_act = np.asarray(np.clip(fill_value.astype(np.float64), info.min, info.max), dtype=act).reshape(())
    concat_v = _expanded_kv(G, last.input[1])
    if concat_v is None:
        return "V is not the expanded present value"
    past_k, k_new = concat_k.input
    past_v, v_new = concat_v.input
    present_k, present_v = concat_k.output[0], concat_v.output[0]
    if past_k not in graph_inputs or past_v not in graph_inputs:
        return "past K/V are not graph inputs"
    if present_k not in graph_outputs or present_v not in graph_outputs:
        return "present K/V are not graph outputs"
    # present K/V may only feed the graph outputs and their own expand chains
    for name in (present_k, present_v):
        if len(G.consumers.get(name, [])) != 1:
            return f"{name} has other consumers"
    inner_names = [mul.output[0], qk.output[0], where.output[0], sm.output[0]]
    inner_names += [c.output[0] for c in (up, down) if c is not None]
    for inner in inner_names:
        if len(G.consumers.get(inner, [])) != 1:
            return f"{inner} has other consumers"
    # head counts: from the expand target shape [B, kv, rep, T, D]
    shape_k = kv_shape.get(past_k)
    kv_heads = shape_k[1] if shape_k and len(shape_k) == 4 else None
    exp = G.prod(G.prod(tr.input[0], "Reshape").input[0], "Expand")
    rep = _expand_rep(G, exp)
    if kv_heads is None or rep is None:
        return "head counts are not static"
    return {
        "q": q, "k_new": k_new, "v_new": v_new, "past_k": past_k, "past_v": past_v,
        "present_k": present_k, "present_v": present_v, "out": last.output[0], "last": last,
        "concat_k": concat_k, "concat_v": concat_v, "where": where, "cond": cond, "fill": fill,
        "fill_value": fill_act, "scale": float(scale.reshape(())),
        "q_heads": int(kv_heads * rep), "kv_heads": int(kv_heads),
    }


def _expanded_kv(G: _Graph, name: str):
    """``name`` = Reshape(Expand(Unsqueeze(present, axes=[2]), [B, kv, rep, T, D]), [B, kv*rep, T, D])
    (repeat_interleave over heads): return the present tensor's producer Concat(past, new, axis=2)."""
    r = G.prod(name, "Reshape")
    e = r and G.prod(r.input[0], "Expand")
    u = e and G.prod(e.input[0], "Unsqueeze")
    if u is None or len(u.input) < 2:
        return None
    axes = G.const(u.input[1])
    if axes is None or axes.reshape(-1).tolist() != [2]:
        return None
    c = G.prod(u.input[0], "Concat")
    if c is None or len(c.input) != 2 or _attr(c, "axis") not in (2, -2):
        return None
    return c


def _expand_rep(G: _Graph, exp):
    """The ``rep`` entry (index 2) of the Expand target shape, if constant."""
    if exp is None:
        return None
    direct = G.const(exp.input[1])
    if direct is not None:
        return int(direct.reshape(-1)[2]) if direct.size == 5 else None
    c = G.prod(exp.input[1], "Concat")
    if c is None or len(c.input) != 5:
        return None
    v = G.const(c.input[2])
    return int(v.reshape(-1)[0]) if v is not None and v.size == 1 else None


def _attention_3d(model) -> int:
    """Feed each fused ``Attention`` the projections as [B, S, heads*head_dim] and let it return
    that layout: drops the per-head Reshape + Transpose around Q, K, V and the output (RoPE runs
    on the 3D tensor with ``num_heads``), 8 copy nodes per layer."""
    g = model.graph
    G = _Graph(g)
    head_dim = None
    for vi in g.input:
        if vi.name.startswith("past_key_values.") and vi.type.HasField("tensor_type"):
            dims = vi.type.tensor_type.shape.dim
            head_dim = dims[3].dim_value if len(dims) == 4 and dims[3].dim_value else None
            break
    if not head_dim:
        return 0
    from onnx import helper

    done = 0
    drop: set[int] = set()
    for att in [n for n in g.node if n.op_type == "Attention" and n.domain in ("", "ai.onnx")]:
        plan = _plan_3d(G, att, head_dim)
        if plan is None:
            continue
        (q_src, q_rope), (k_src, k_rope), v_src, (out_tr, out_rs) = plan
        drop.update((id(out_tr), id(out_rs)))
        for src, rope, heads in ((q_src, q_rope, _attr(att, "q_num_heads")),
                                 (k_src, k_rope, _attr(att, "kv_num_heads"))):
            rope.input[0] = src
            rope.attribute.append(helper.make_attribute("num_heads", int(heads)))
        att.input[2] = v_src
        att.output[0] = out_rs.output[0]
        done += 1
    if drop:  # the output Transpose/Reshape; the input ones are dead now and go with the cleanup
        _splice(g, drop=drop)
    return done


def _plan_3d(G: "_Graph", att, head_dim):
    def heads_of(name):
        """name = Transpose(Reshape(src, [*, *, H|-1, head_dim]), perm=[0,2,1,3]) -> src."""
        tr = G.prod(name, "Transpose")
        if tr is None or list(_attr(tr, "perm", [])) != [0, 2, 1, 3] or len(G.consumers.get(name, [])) != 1:
            return None
        rs = G.prod(tr.input[0], "Reshape")
        if rs is None or len(G.consumers.get(rs.output[0], [])) != 1:
            return None
        last = _last_shape_entry(G, rs.input[1], 4)
        return rs.input[0] if last == head_dim else None

    qk = []
    for idx in (0, 1):
        rope = G.producer.get(att.input[idx])
        if rope is None or rope.op_type != "RotaryEmbedding" or len(G.consumers.get(rope.output[0], [])) != 1:
            return None
        src = heads_of(rope.input[0])
        if src is None:
            return None
        qk.append((src, rope))
    v_src = heads_of(att.input[2])
    if v_src is None:
        return None
    users = G.consumers.get(att.output[0], [])
    tr = users[0] if len(users) == 1 and users[0].op_type == "Transpose" else None
    if tr is None or list(_attr(tr, "perm", [])) != [0, 2, 1, 3]:
        return None
    users = G.consumers.get(tr.output[0], [])
    rs = users[0] if len(users) == 1 and users[0].op_type == "Reshape" else None
    if rs is None or _last_shape_entry(G, rs.input[1], 3) != head_dim * _attr(att, "q_num_heads"):
        return None
    return qk[0], qk[1], v_src, (tr, rs)


def _last_shape_entry(G: "_Graph", shape_name: str, rank: int):
    """Last entry of a Reshape target of ``rank`` entries (a constant or a Concat ending in one)."""
    v = G.const(shape_name)
    if v is not None:
        v = v.reshape(-1)
        return int(v[-1]) if v.size == rank else None
    c = G.prod(shape_name, "Concat")
    if c is None:
        return None
    parts = [G.const(i) for i in c.input]
    if parts[-1] is None or sum(1 if p is None else p.size for p in parts) != rank:
        return None
    return int(parts[-1].reshape(-1)[-1])


fuse_attention = _fuse_attention
attention_3d = _attention_3d

__all__ = ["attention_3d", "fuse_attention"]
