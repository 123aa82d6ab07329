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

Then the q/k/v MatMuls of each layer are packed into one (quantized ones by :mod:`.ort_pack`,
which also serves a tied int4 table's embedding rows with ``GatherBlockQuantized``), and where
the kernel allows, :mod:`.ort_gqa` turns Split + two RoPE + Attention into one
``GroupQueryAttention`` on an in-place KV cache whose padding bias and lengths the session feeds
(the export's mask subgraph goes). Finally the lm head reads only the positions the session asks
for (:data:`LOGITS_INDEX`). Counts and timings: benchmarks/RESULTS.md.

A block that does not match the expected pattern is left as it is. The pass runs on the
graph without its weights (:mod:`.onnx_skeleton`); :mod:`.ort_cache` keeps the result per
export, outside the export folder, and ONNX Runtime reads the weights from the export's file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ...quantize.schemes import OrtKernelForm
from ...trt_engines.lowering import (
    MIN_NATIVE_OPSET, LoweringOptions, _drop_unused, count_fused_nodes, default_opset, lower_model,
)
from .ort_attention import attention_3d, fuse_attention
from .ort_gqa import attention_fill, attention_to_gqa, kv_layout
from .ort_graph import _attr, _Graph, _remove_dead_nodes, _splice, readers, unshared_name
from .ort_head import RESCORE_K, SCAN_RESCORE_K, int4_head_scan, rescore_int8_head
from .ort_pack import (
    PACK_MIN,
    drop_zero_int8_zero_points,
    gather_quantized_rows,
    gather_rows_before_cast,
    int8_kernel_blocks,
    pack_quantized_matmuls,
    transposed_gathers,
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
    int8_kernel_block: str = ""        # "n @ b": per-channel int8 weights written in blocks of b for MatMulNBits
    quantized_row_gathers: int = 0     # embeddings gathered from a dequantized int4 table -> GatherBlockQuantized
    fp16_row_gathers: int = 0          # embeddings gathered from the fp16 table, then cast (not the whole table)
    group_query_attention: int = 0     # attention blocks -> GroupQueryAttention on an in-place KV cache
    kv_layout: str = "concat"          # "shared-buffer" when every block is GroupQueryAttention
    attention_fill: float | None = None  # the padding bias' fill value the session feeds (shared-buffer)
    logits_index: bool = False         # the lm head reads only the positions fed in LOGITS_INDEX
    head_rescored: int = 0             # int8 head: top-k logits per position recomputed in fp32 (ort_head)
    head_scan: str = ""                # the rescored head's candidates found by an int4 copy (ort_head)
    row_gathers: int = 0               # column gathers from a quantized head's tensors -> rows of a transposed copy
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
            **({"per-channel int8 weights in kernel blocks (count @ block)": self.int8_kernel_block}
               if self.int8_kernel_block else {}),
            "embedding rows gathered from the int4 table (GatherBlockQuantized)": self.quantized_row_gathers,
            "embedding rows gathered from the fp16 table, then cast": self.fp16_row_gathers,
            "GroupQueryAttention(com.microsoft, RoPE inside, KV cache updated in place)": self.group_query_attention,
            "kv_layout": self.kv_layout,
            **({"attention_fill": self.attention_fill} if self.attention_fill is not None else {}),
            f"lm head on the positions in input {LOGITS_INDEX!r} only": self.logits_index,
            "int8 lm head: top-k logits per position recomputed with fp32 activations (k)": self.head_rescored,
            **({"int8 lm head: candidates found by an int4 copy of it": self.head_scan} if self.head_scan else {}),
            "column gathers from the quantized head's tensors read rows of a transposed copy": self.row_gathers,
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
                  pack_matmuls: bool = True, group_query_attention: bool = True, rescore_head: bool = True,
                  weights_dir=None, form: OrtKernelForm = OrtKernelForm()):
    """Return ``(rewritten copy, OrtLoweringReport)``; ``model`` is not modified.

    ``weights_dir``: where the model's external weights lie (quantized projections are packed
    from their values; without it they stay as they are). ``form``: the kernel form of the
    quantized weights (the int8 kernel block, :func:`.ort_pack.int8_kernel_blocks`; the bits of
    an int8 head's candidate search, :func:`.ort_head.int4_head_scan`)."""
    report = OrtLoweringReport(nodes_before=_inlined_node_count(model))
    counts = count_fused_nodes(model)
    out, _routes = lower_model(model, LoweringOptions(max_context=int(max_context), rms_norm_native=True))
    report.rotary_embedding = counts.get("RotaryEmbedding", 0)
    report.rms_norm = counts.get("RMSNorm", 0)
    if attention:
        fuse_attention(out, report)
        if report.attention:
            _remove_dead_nodes(out)  # the replaced score/softmax chains still read Q/K/V
            report.attention_3d = attention_3d(out)
    if simplified_layer_norm:
        _to_simplified_layer_norm(out)
        report.skip_norm = _fuse_skip_norm(out)
    report.unshared_quantized = _unshare_quantized_weights(out)
    report.fp16_row_gathers = gather_rows_before_cast(out)
    readable = weights_dir is not None or not _has_external(out)  # quantized values can be read
    if pack_matmuls:
        report.packed_matmuls = _pack_matmuls(out)
        if readable:
            report.zero_points_dropped = drop_zero_int8_zero_points(out, weights_dir)
            widened = int8_kernel_blocks(out, weights_dir, form.int8_block)
            report.int8_kernel_block = f"{widened} @ {form.int8_block}" if widened else ""
            report.quantized_row_gathers = gather_quantized_rows(out, weights_dir)
            report.packed_quantized = pack_quantized_matmuls(out, weights_dir)
    if attention and group_query_attention and report.attention:
        _remove_dead_nodes(out)  # the per-head reshapes _attention_3d bypassed still read q/k/v
        report.group_query_attention, why = attention_to_gqa(out, _head_dim(out))
        if why:
            report.notes.append(f"GroupQueryAttention not used: {why}")
        report.kv_layout = kv_layout(out)
        report.attention_fill = attention_fill(out)
    report.logits_index = _logits_index(out)
    scan = form.head_scan_bits == 4 and readable  # the int4 copy is made from the int8 head's values
    k = SCAN_RESCORE_K[form.head_scan_block] if scan else RESCORE_K
    if rescore_head and rescore_int8_head(out, k):
        report.head_rescored = k
        report.unshared_quantized += _unshare_quantized_weights(out)  # an untied head's DQ now shares q
    if pack_matmuls and readable:
        report.row_gathers = transposed_gathers(out, weights_dir)
    if report.head_rescored and scan:
        block = form.head_scan_block
        report.head_scan = f"int4 in blocks of {block}, {k} rescored" if int4_head_scan(out, weights_dir, block) else ""
    _remove_dead_nodes(out)
    _drop_unused(out)
    _drop_unread_inputs(out)
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


def _drop_unread_inputs(model) -> None:
    """Graph inputs no node reads (``attention_mask`` once GroupQueryAttention takes the session's
    bias): ONNX Runtime would insist on being fed them."""
    from ...trt_engines.lowering import _names_read

    read = _names_read(model.graph.node) | {o.name for o in model.graph.output}
    keep = [i for i in model.graph.input if i.name in read]
    if len(keep) != len(model.graph.input):
        del model.graph.input[:]
        model.graph.input.extend(keep)


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


def _pack_matmuls(model) -> str:
    """MatMuls reading the same activation with constant 2D weights (q/k/v) -> one MatMul
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
        if len(mms) < PACK_MIN or len({w.dims[0] for w in ws}) != 1 or len({w.data_type for w in ws}) != 1:
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
    reading = readers(g)
    done = 0
    for dq in [n for n in g.node if n.op_type == "DequantizeLinear" and n.domain in ("", "ai.onnx")]:
        shared = [i for i, name in enumerate(dq.input) if name in inits
                  and any(r is not dq for r in reading.get(name, []))]
        if not shared or dq.input[0] not in inits:
            continue
        for i in shared:  # weight, scale and zero point alike (a Gather may read all three)
            alias = type(inits[dq.input[i]])()
            alias.CopyFrom(inits[dq.input[i]])
            alias.name = unshared_name(dq.input[i], dq)
            g.initializer.append(alias)
            dq.input[i] = alias.name
        done += 1
    return done


__all__ = ["LOGITS_INDEX", "OrtLoweringReport", "can_lower", "lower_for_ort"]
