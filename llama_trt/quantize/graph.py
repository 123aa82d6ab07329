"""Find the linear MatMuls of an fp32 export, name them after the checkpoint, inspect Q/DQ graphs.

Weights are matched by value against the checkpoint (``B == W.T``), so the exporter's
constant names (``val_78``) do not matter; each matched initializer is renamed
``<module>.weight_t``. A tied lm head reads ``Transpose(embedding table)``: it gets its own
transposed initializer only when it is to be quantized (``materialize_tied``), so an export
that keeps the head in float stores the table once.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ExportError

_LINEAR_RE = re.compile(r"^(model\.layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)|lm_head)\.weight$")


@dataclass
class LinearSite:
    name: str           # module name in HF naming: model.layers.0.self_attn.q_proj, lm_head
    node: str           # MatMul node name
    weight: str         # its B initializer ([K, N]) after renaming: <name>.weight_t
    input: str          # activation tensor feeding the MatMul
    shape: tuple[int, int]


@dataclass
class GraphInfo:
    sites: list[LinearSite]
    embedding: tuple[str, str] | None       # (Gather node name, table initializer name)
    attention_matmuls: list[str]            # activation x activation MatMuls (left alone)
    tied_head: str | None = None            # MatMul reading Transpose(embedding) when left as it is
    head_is_table: bool = False             # the lm_head site's weight equals the embedding table, transposed


def _digest(arr: np.ndarray) -> str:
    a = np.ascontiguousarray(arr, dtype=np.float32)
    return hashlib.sha1(a.tobytes() + str(a.shape).encode()).hexdigest()


def _to_np(t) -> np.ndarray:
    if hasattr(t, "detach"):
        import torch

        return t.detach().to(torch.float32).cpu().numpy()
    return np.asarray(t, dtype=np.float32)


def _tied_heads(graph, inits) -> list[tuple[object, object]]:
    """(MatMul, Transpose) pairs where a MatMul weight is ``Transpose(2-D fp32 initializer)``."""
    producers = {o: n for n in graph.node for o in n.output}
    out = []
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] in inits:
            continue
        prod = producers.get(node.input[1])
        if prod is None or prod.op_type != "Transpose" or prod.input[0] not in inits:
            continue
        perm = next((list(a.ints) for a in prod.attribute if a.name == "perm"), [1, 0])
        src = inits[prod.input[0]]
        if len(src.dims) == 2 and perm == [1, 0] and src.data_type == 1:
            out.append((node, prod))
    return out


def _materialize(graph, inits, pairs) -> None:
    """Give each tied MatMul its own transposed initializer; drop Transposes left unread."""
    from onnx import numpy_helper

    removed = set()
    for node, prod in pairs:
        src = numpy_helper.to_array(inits[prod.input[0]])
        new = numpy_helper.from_array(np.ascontiguousarray(src.T), f"{prod.input[0]}_t")
        graph.initializer.append(new)
        inits[new.name] = new
        node.input[1] = new.name
        if not any(prod.output[0] in n.input for n in graph.node) and prod.output[0] not in {o.name for o in graph.output}:
            removed.add(id(prod))
    if removed:
        keep = [n for n in graph.node if id(n) not in removed]
        del graph.node[:]
        graph.node.extend(keep)


def analyse_graph(model, state_dict, *, materialize_tied: bool = True) -> GraphInfo:
    """Find the linear MatMuls of ``model`` (fp32 export, edited in place) and name them.

    Weights are matched by value against the checkpoint (``B == W.T``), so the exporter's
    constant names (``val_78``) do not matter. A MatMul whose weight is ``Transpose`` of
    an initializer (the tied lm head) gets its own transposed initializer when
    ``materialize_tied``; otherwise it is left reading the table (``GraphInfo.tied_head``).
    """
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    by_digest: dict[str, str] = {}
    for key, tensor in state_dict.items():
        m = _LINEAR_RE.match(key)
        if m:
            by_digest.setdefault(_digest(_to_np(tensor).T), m.group(1))
    pairs = _tied_heads(graph, inits)
    tied = None
    if materialize_tied:
        _materialize(graph, inits, pairs)
    elif pairs:
        tied = pairs[0][0].name

    sites, attention, renames = [], [], {}
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        init = inits.get(node.input[1])
        if init is None or len(init.dims) != 2 or init.data_type != 1:
            if node.name != tied:
                attention.append(node.name)
            continue
        name = by_digest.get(_digest(numpy_helper.to_array(init)))
        if name is None:
            attention.append(node.name)
            continue
        new_name = f"{name}.weight_t"
        renames[init.name] = new_name
        sites.append(LinearSite(name, node.name, new_name, node.input[0], tuple(int(d) for d in init.dims)))
    for old, new in renames.items():
        inits[old].name = new
        for n in graph.node:
            for i, inp in enumerate(n.input):
                if inp == old:
                    n.input[i] = new

    embedding = None
    for node in graph.node:
        if node.op_type == "Gather" and node.input[0] in {i.name for i in graph.initializer}:
            table = next(i for i in graph.initializer if i.name == node.input[0])
            if len(table.dims) == 2 and table.data_type == 1:
                embedding = (node.name, node.input[0])
                break
    order = {n: i for i, n in enumerate(("q", "k", "v", "o", "gate", "up", "down"))}

    def key(s: LinearSite):
        m = re.match(r"model\.layers\.(\d+)\..*?(\w+)_proj$", s.name)
        return (int(m.group(1)), order[m.group(2)]) if m else (1 << 30, 0)

    sites.sort(key=key)
    info = GraphInfo(sites, embedding, attention, tied)
    _share_tied_table(model, info, keep_site=materialize_tied)
    return info


def _share_tied_table(model, info: GraphInfo, keep_site: bool) -> None:
    """The exporter may constant-fold ``Transpose(table)`` into a second float copy of a tied
    table. Detect it (by value); unless the head is to be quantized (``keep_site``), read the table
    through a Transpose again and drop the copy, so the file holds the matrix once."""
    from onnx import helper

    head = next((s for s in info.sites if s.name == "lm_head"), None)
    if head is None or info.embedding is None:
        return
    graph = model.graph
    table = _init_array(graph, info.embedding[1])
    if table.shape[::-1] != tuple(head.shape) or _digest(table.T) != _digest(_init_array(graph, head.weight)):
        return
    info.head_is_table = True
    if keep_site:
        return
    t_out = f"{info.embedding[1]}_transposed"
    idx = next(i for i, n in enumerate(graph.node) if n.name == head.node)
    graph.node[idx].input[1] = t_out
    graph.node.insert(idx, helper.make_node("Transpose", [info.embedding[1]], [t_out], name=f"{head.node}_tied",
                                            perm=[1, 0]))
    del graph.initializer[next(i for i, t in enumerate(graph.initializer) if t.name == head.weight)]
    info.sites.remove(head)
    info.tied_head = head.node


def _replace_init(graph, name: str, arr: np.ndarray) -> None:
    from onnx import numpy_helper

    for i, init in enumerate(graph.initializer):
        if init.name == name:
            graph.initializer[i].CopyFrom(numpy_helper.from_array(arr, name))
            return
    raise KeyError(name)


def private_initializer(graph, name: str, reader) -> str:
    """The name of an initializer holding ``name``'s value that only ``reader`` reads: ``name``
    itself, or a copy when other nodes read it too. The exporter stores equal tensors once (a
    model whose RMSNorm weights are all ones has one such vector for every norm), so a fold
    into one reader's weight must not reach the others."""
    if all(n is reader or name not in n.input for n in graph.node):
        return name
    src = next(i for i in graph.initializer if i.name == name)
    taken = {i.name for i in graph.initializer}
    own = next(f"{name}.{k}" for k in range(len(taken) + 1) if f"{name}.{k}" not in taken)
    copy = graph.initializer.add()
    copy.CopyFrom(src)
    copy.name = own
    reader.input[:] = [own if i == name else i for i in reader.input]
    return own


def _init_array(graph, name: str) -> np.ndarray:
    from onnx import numpy_helper

    return numpy_helper.to_array(next(i for i in graph.initializer if i.name == name))


_BITS = {1: 32, 10: 16, 16: 16, 11: 64, 7: 64, 6: 32, 3: 8, 2: 8, 21: 4, 22: 4}
_NAMES = {1: "fp32", 10: "fp16", 16: "bf16", 3: "int8", 2: "uint8", 21: "uint4", 22: "int4", 7: "int64", 6: "int32"}


def weight_bytes(model) -> dict[str, int]:
    """Bytes of the initializers per element type ("fp32", "int8", "int4", ...), as stored."""
    out: dict[str, int] = {}
    for t in model.graph.initializer:
        n = int(np.prod(t.dims)) if len(t.dims) else 1
        key = _NAMES.get(t.data_type, str(t.data_type))
        out[key] = out.get(key, 0) + (n * _BITS.get(t.data_type, 8) + 7) // 8
    return dict(sorted(out.items()))


def inspect_quantized(model) -> dict[str, Any]:
    """Q/DQ facts of a graph: int8 initializers, DQ nodes (axis, scale shape), activation Q nodes, zero points."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    dq, q_nodes = [], []
    for n in graph.node:
        if n.op_type == "DequantizeLinear":
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            block = next((a.i for a in n.attribute if a.name == "block_size"), 0)
            src = n.input[0]
            dq.append({
                "node": n.name, "input": src, "weight": src in inits, "axis": int(axis), "block_size": int(block),
                "weight_dtype": int(inits[src].data_type) if src in inits else None,
                "scale": n.input[1], "scale_shape": list(inits[n.input[1]].dims) if n.input[1] in inits else None,
                "scale_dtype": int(inits[n.input[1]].data_type) if n.input[1] in inits else None,
                "zero_point": n.input[2] if len(n.input) > 2 else None,
            })
        elif n.op_type == "QuantizeLinear":
            q_nodes.append({"node": n.name, "input": n.input[0], "scale": n.input[1]})
    zps = [numpy_helper.to_array(inits[d["zero_point"]]) for d in dq if d["zero_point"] in inits]
    return {
        "int8_initializers": sorted(i.name for i in graph.initializer if i.data_type == 3),
        "int4_initializers": sorted(i.name for i in graph.initializer if i.data_type in (21, 22)),
        "weight_bytes": weight_bytes(model),
        "dequantize": dq,
        "quantize": q_nodes,
        "zero_points_all_zero": all(not np.any(z) for z in zps),
        "functions": sorted(f.name for f in model.functions),
        "plugin_nodes": sum(1 for n in graph.node if n.domain == "llama_trt"),
    }


def check_no_float_copies(model, originals: dict[str, str], allowed=()) -> None:
    """No float initializer equals (or is the transpose of) a quantized weight.

    ``allowed``: initializers that legitimately stay float (a tied embedding table that is
    not quantized while the lm head is)."""
    from onnx import numpy_helper

    left = []
    for init in model.graph.initializer:
        if init.data_type not in (1, 10, 16) or len(init.dims) != 2 or init.name in allowed:
            continue
        arr = numpy_helper.to_array(init)
        for d in (_digest(arr), _digest(arr.T)):
            if d in originals:
                left.append(f"{init.name} (= {originals[d]})")
    if left:
        raise ExportError(f"internal error: float copies of quantized weights remain: {', '.join(left[:4])}")




__all__ = ["GraphInfo", "LinearSite", "analyse_graph", "check_no_float_copies", "inspect_quantized", "weight_bytes"]
