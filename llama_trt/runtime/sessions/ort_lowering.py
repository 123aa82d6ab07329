"""Session-time ONNX rewrite for ONNX Runtime (CPU): fused kernels instead of many tiny ops.

The export runs RMSNorm and RoPE as ``llama_trt`` local functions, which ONNX Runtime
inlines (~12 nodes per RMSNorm, ~27 per RoPE including an ``If``), and attention as
Concat / Unsqueeze / Expand / Reshape / Transpose / MatMul / Mul / Where / Softmax / MatMul
per layer (the GQA expand copies the whole cache every step). At batch 1 decode those
~1000 nodes cost more in dispatch than their arithmetic. This pass rewrites, in memory:

* ``llama_trt.RotaryEmbedding`` -> opset-23 ``RotaryEmbedding`` with cos/sin caches and
  ``llama_trt.RMSNorm`` -> opset-23 ``RMSNormalization`` (both via
  :func:`llama_trt.trt_engines.lowering.lower_model`, the TensorRT "native" route), the
  latter then renamed to ORT's ``SimplifiedLayerNormalization`` (same attributes) and fused
  with the residual ``Add`` before it into ``com.microsoft.SkipSimplifiedLayerNormalization``;
* each layer's attention block -> one opset-23 ``Attention`` node (GQA via
  ``q_num_heads`` / ``kv_num_heads``, past/present KV, the same additive mask the export
  computes: 0 where attended, the export's fill value elsewhere), which writes
  ``present.*`` itself, so the IO contract is unchanged; it takes Q/K/V as
  [batch, seq, heads*head_dim] (RoPE with ``num_heads``), so the per-head
  Reshape/Transpose copies around it go too.

Finally MatMuls that read the same activation with constant weights (q/k/v, gate/up) are
packed into one MatMul + Split. On the 124.7M benchmark model ORT executes 176 nodes per
decode step instead of 984 (49 MatMuls instead of 97 + 12 FusedMatMul); timings in
benchmarks/RESULTS.md.

A block that does not match the expected pattern is left as it is. The pass runs on the
graph without its weights (:mod:`.onnx_skeleton`); :mod:`.ort_cache` keeps the result per
export, outside the export folder, and ONNX Runtime reads the weights from the export's file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .ort_gqa import attention_to_gqa, kv_layout
from .ort_pack import drop_zero_int8_zero_points, pack_quantized_matmuls
from ...trt_engines.lowering import (
    MIN_NATIVE_OPSET, LoweringOptions, _constant_values, _drop_unused, _names_read, count_fused_nodes,
    default_opset, lower_model,
)


@dataclass
class OrtLoweringReport:
    rotary_embedding: int = 0
    rms_norm: int = 0
    attention: int = 0
    attention_blocks: int = 0          # Softmax nodes seen (attention candidates)
    attention_3d: int = 0              # Attention nodes fed [B, S, H*D] directly (no head transposes)
    skip_norm: int = 0                 # Add + norm pairs -> SkipSimplifiedLayerNormalization
    packed_matmuls: str = ""           # "a -> b": MatMuls sharing an input packed into one + Split
    unshared_quantized: int = 0        # quantized weights also read by another node: DQ given its own entry
    packed_quantized: str = ""         # "a -> b": quantized MatMuls sharing an input packed into one + Split
    zero_points_dropped: int = 0       # all-zero int8 zero points removed (symmetric MatMulNBits)
    group_query_attention: int = 0     # attention blocks -> GroupQueryAttention on an in-place KV cache
    kv_layout: str = "concat"          # "shared-buffer" when every block is GroupQueryAttention
    logits_index: bool = False         # the lm head reads only the positions fed in LOGITS_INDEX
    nodes_before: int = 0
    nodes_after: int = 0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "RotaryEmbedding(opset 23)": self.rotary_embedding,
            "RMSNorm -> (Skip)SimplifiedLayerNormalization": self.rms_norm,
            "Attention(opset 23)": f"{self.attention}/{self.attention_blocks}",
            "Attention on [batch, seq, heads*head_dim] (head Reshape/Transpose removed)": self.attention_3d,
            "SkipSimplifiedLayerNormalization(com.microsoft)": self.skip_norm,
            "MatMuls with one input and constant weights packed (+ Split)": self.packed_matmuls or "off",
            "quantized weights shared with another reader, DequantizeLinear given its own entry":
                self.unshared_quantized,
            "quantized MatMuls with one input packed (+ Split)": self.packed_quantized or "off",
            "all-zero int8 zero points dropped (symmetric MatMulNBits)": self.zero_points_dropped,
            "GroupQueryAttention(com.microsoft, RoPE inside, KV cache updated in place)": self.group_query_attention,
            "kv_layout": self.kv_layout,
            f"lm head on the positions in input {LOGITS_INDEX!r} only": self.logits_index,
            "graph_nodes": f"{self.nodes_before} -> {self.nodes_after} (function bodies counted inlined)",
            **({"notes": self.notes} if self.notes else {}),
        }


def can_lower(model) -> str | None:
    """None when :func:`lower_for_ort` applies, else why not."""
    if default_opset(model) < MIN_NATIVE_OPSET:
        return f"opset {default_opset(model)} < {MIN_NATIVE_OPSET}"
    return None


def _inlined_node_count(model) -> int:
    sizes = {(f.domain, f.name): len(f.node) for f in model.functions}
    return sum(sizes.get((n.domain, n.op_type), 1) for n in model.graph.node)


def lower_for_ort(model, max_context: int, *, attention: bool = True, simplified_layer_norm: bool = True,
                  pack_matmuls: bool = True, group_query_attention: bool = True, weights_dir=None):
    """Return ``(rewritten copy, OrtLoweringReport)``; ``model`` is not modified.

    ``weights_dir``: where the model's external weights lie (quantized projections are packed
    from their values; without it they stay as they are)."""
    report = OrtLoweringReport(nodes_before=_inlined_node_count(model))
    counts = count_fused_nodes(model)
    out, _routes = lower_model(model, LoweringOptions(max_context=int(max_context), rms_norm_native=True))
    report.rotary_embedding = counts.get("RotaryEmbedding", 0)
    report.rms_norm = counts.get("RMSNorm", 0)
    if attention:
        _fuse_attention(out, report)
        if report.attention:
            _remove_dead_nodes(out)  # the replaced score/softmax chains still read Q/K/V
            report.attention_3d = _attention_3d(out)
    if simplified_layer_norm:
        _to_simplified_layer_norm(out)
        report.skip_norm = _fuse_skip_norm(out)
    report.unshared_quantized = _unshare_quantized_weights(out)
    if pack_matmuls:
        report.packed_matmuls = _pack_matmuls(out)
        if weights_dir is not None or not _has_external(out):
            report.zero_points_dropped = drop_zero_int8_zero_points(out, weights_dir)
            report.packed_quantized = pack_quantized_matmuls(out, weights_dir)
    if attention and group_query_attention and report.attention:
        _remove_dead_nodes(out)  # the per-head reshapes _attention_3d bypassed still read q/k/v
        report.group_query_attention, why = attention_to_gqa(out, _head_dim(out))
        if why:
            report.notes.append(f"GroupQueryAttention not used: {why}")
        report.kv_layout = kv_layout(out)
    report.logits_index = _logits_index(out)
    _remove_dead_nodes(out)
    _drop_unused(out)
    report.nodes_after = _inlined_node_count(out)
    return out, report


LOGITS_INDEX = "llama_trt.logits_index"


def _logits_index(model) -> bool:
    """Put ``Gather(hidden, LOGITS_INDEX, axis=1)`` before the lm head MatMul and make the index a
    graph input: generation needs the last position's logits only, and the head is the largest
    GEMM of a prefill (SmolLM2: 49152 x 576 per position). The session feeds ``arange(seq)`` for
    every position, or ``[seq - 1]``."""
    from onnx import TensorProto, helper

    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    node = producer.get("logits")
    while node is not None and node.op_type == "Cast":
        node = producer.get(node.input[0])
    if node is None or node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
        return False
    hidden = node.input[0]
    picked = f"{hidden}.{LOGITS_INDEX}"
    gather = helper.make_node("Gather", [hidden, LOGITS_INDEX], [picked], name=picked, axis=1)
    nodes = []
    for n in g.node:
        if n is node:
            nodes.append(gather)
        nodes.append(n)
    node.input[0] = picked
    del g.node[:]
    g.node.extend(nodes)
    g.input.append(helper.make_tensor_value_info(LOGITS_INDEX, TensorProto.INT64, ["logits_positions"]))
    for out in g.output:
        if out.name == "logits" and out.type.tensor_type.shape.dim:
            out.type.tensor_type.shape.dim[1].dim_param = "logits_positions"
    return True


def _has_external(model) -> bool:
    from onnx.external_data_helper import uses_external_data

    return any(uses_external_data(t) for t in model.graph.initializer)


def _head_dim(model) -> int | None:
    for vi in model.graph.input:
        if vi.name.startswith("past_key_values.") and vi.type.HasField("tensor_type"):
            dims = vi.type.tensor_type.shape.dim
            return (dims[3].dim_value or None) if len(dims) == 4 else None
    return None


def _to_simplified_layer_norm(model) -> None:
    """``RMSNormalization`` -> ORT's ``SimplifiedLayerNormalization`` (same inputs and attributes:
    axis, epsilon, stash_type), which has a Skip variant in ``com.microsoft`` (see
    :func:`_fuse_skip_norm`). ORT registers it in the default domain, as onnxruntime-genai's
    models use it."""
    for n in model.graph.node:
        if n.op_type == "RMSNormalization" and n.domain in ("", "ai.onnx"):
            n.op_type = "SimplifiedLayerNormalization"


def _fuse_skip_norm(model) -> int:
    """``SimplifiedLayerNormalization(Add(a, b), w)`` -> ``com.microsoft.SkipSimplifiedLayerNormalization
    (a, b, w)`` whose 4th output is the sum (still read by the next residual Add). ORT 1.32's
    own SkipLayerNorm fusion did not fire on the exported graph, hence done here."""
    from onnx import helper

    g = model.graph
    G = _Graph(g)
    consts = set(G.consts)
    fused: dict[int, Any] = {}
    for n in g.node:
        if n.op_type != "SimplifiedLayerNormalization" or n.domain not in ("", "ai.onnx"):
            continue
        add = G.prod(n.input[0], "Add")
        if add is None or id(add) in fused or any(i in consts or i not in G.producer for i in add.input):
            continue
        if _attr(n, "axis", -1) != -1 or len(n.output) > 1 and any(n.output[1:]):
            continue
        fused[id(n)] = helper.make_node(
            "SkipSimplifiedLayerNormalization", [add.input[0], add.input[1], n.input[1]],
            [n.output[0], "", "", add.output[0]], name=(n.name or n.output[0]) + ".skip",
            domain="com.microsoft", epsilon=float(_attr(n, "epsilon", 1e-5)),
        )
        fused[id(add)] = None
    if not fused:
        return 0
    # the fused node takes the norm's place: the sum's other readers all come after the norm
    # (the next residual Add), and both Add inputs are produced before the Add
    new_nodes = []
    for n in g.node:
        if id(n) not in fused:
            new_nodes.append(n)
        elif fused[id(n)] is not None:
            new_nodes.append(fused[id(n)])
    sum_users_ok = all(_first_use_after(new_nodes, f) for f in fused.values() if f is not None)
    if not sum_users_ok:
        return 0
    del g.node[:]
    g.node.extend(new_nodes)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return sum(f is not None for f in fused.values())


def _first_use_after(nodes, node) -> bool:
    """True when nothing before ``node`` in ``nodes`` reads one of its outputs."""
    outs = {o for o in node.output if o}
    for n in nodes:
        if n is node:
            return True
        if outs & set(n.input):
            return False
    return False


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


def _pack_matmuls(model) -> str:
    """MatMuls reading the same activation with constant 2D weights (q/k/v; gate/up) -> one MatMul
    over the weights concatenated along N, then Split: one weight pass per group. Weights held in
    the graph are concatenated here; weights left in the export's file (external data) get a
    ``Concat`` node instead, which ONNX Runtime folds into one constant at session open, so no
    second copy of them is written anywhere."""
    from onnx import helper, numpy_helper
    from onnx.external_data_helper import uses_external_data

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    groups: dict[str, list] = {}
    for n in g.node:
        w = inits.get(n.input[1]) if n.op_type == "MatMul" and n.domain in ("", "ai.onnx") else None
        if w is not None and len(w.dims) == 2:
            groups.setdefault(n.input[0], []).append(n)
    before = sum(len(v) for v in groups.values())
    replace: dict[int, list] = {}
    drop: set[int] = set()
    for x, mms in groups.items():
        ws = [inits[m.input[1]] for m in mms]
        if len(mms) < 2 or len({w.dims[0] for w in ws}) != 1 or len({w.data_type for w in ws}) != 1:
            continue
        k = len(replace)
        wname, yname = f"llama_trt.packed_weight.{k}", f"llama_trt.packed_matmul.{k}"
        sizes = f"{yname}.split"
        g.initializer.append(numpy_helper.from_array(np.array([w.dims[1] for w in ws], dtype=np.int64), sizes))
        nodes = []
        if any(uses_external_data(w) for w in ws):
            nodes.append(helper.make_node("Concat", [w.name for w in ws], [wname], name=wname, axis=1))
        else:
            arrays = [numpy_helper.to_array(w) for w in ws]
            g.initializer.append(numpy_helper.from_array(np.concatenate(arrays, axis=1), wname))
        # placed where the first of the group was: every MatMul of the group reads only x
        replace[id(mms[0])] = nodes + [
            helper.make_node("MatMul", [x, wname], [yname], name=yname),
            helper.make_node("Split", [yname, sizes], [m.output[0] for m in mms], name=yname + ".split", axis=-1),
        ]
        drop.update(id(m) for m in mms[1:])
    if not replace:
        return f"{before} -> {before}"
    _splice(g, replace, drop)
    return f"{before} -> {before - len(drop)}"


def _unshare_quantized_weights(model) -> int:
    """A quantized weight read by a ``DequantizeLinear`` and by another node (an int4 export's tied
    table: the lm head's DQ and the embedding's ``Gather``) keeps ONNX Runtime from fusing DQ +
    MatMul into ``MatMulNBits``: it then dequantizes the whole table every step (80% of an int4
    SmolLM2 decode step). The DQ gets its own initializer entry; for a weight left in the export
    file that entry references the same bytes, so nothing is copied on disk."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    readers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    done = 0
    for dq in [n for n in g.node if n.op_type == "DequantizeLinear" and n.domain in ("", "ai.onnx")]:
        shared = [i for i, name in enumerate(dq.input) if name in inits
                  and any(r is not dq for r in readers.get(name, []))]
        if not shared or dq.input[0] not in inits:
            continue
        for i in shared:  # weight, scale and zero point alike (a Gather may read all three)
            alias = type(inits[dq.input[i]])()
            alias.CopyFrom(inits[dq.input[i]])
            alias.name = f"{dq.input[i]}.{dq.name or dq.output[0]}"
            g.initializer.append(alias)
            dq.input[i] = alias.name
        done += 1
    return done


def _splice(g, replace: dict[int, list] | None = None, drop=()) -> None:
    """Rewrite ``g.node`` in order: a node whose id is in ``replace`` gives way to that list of
    nodes (which may include itself), one in ``drop`` goes, every other node stays."""
    replace = replace or {}
    new_nodes = []
    for n in g.node:
        if id(n) in replace:
            new_nodes.extend(replace[id(n)])
        elif id(n) not in drop:
            new_nodes.append(n)
    del g.node[:]
    g.node.extend(new_nodes)


# ----------------------------------------------------------------------------- attention


class _Graph:
    def __init__(self, graph) -> None:
        self.g = graph
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.consts = _constant_values(graph)

    def prod(self, name, op_type):
        n = self.producer.get(name)
        return n if n is not None and n.op_type == op_type and n.domain in ("", "ai.onnx") else None

    def const(self, name):
        f = self.consts.get(name)
        return None if f is None else np.asarray(f())


def _attr(node, name, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


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


def _fuse_attention(model, report: OrtLoweringReport) -> None:
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


# ----------------------------------------------------------------------------- cleanup


def _remove_dead_nodes(model) -> None:
    g = model.graph
    outputs = {o.name for o in g.output}
    nodes = list(g.node)
    while True:
        read = _names_read(nodes) | outputs
        keep = [n for n in nodes if any(o in read for o in n.output if o)]
        if len(keep) == len(nodes):
            break
        nodes = keep
    if len(nodes) != len(g.node):
        del g.node[:]
        g.node.extend(nodes)


__all__ = ["LOGITS_INDEX", "OrtLoweringReport", "can_lower", "lower_for_ort"]
