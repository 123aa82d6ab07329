"""Q/DQ graph writing: a float weight initializer becomes integer + scale + ``DequantizeLinear``.

The form is the one TensorRT / TensorRT-RTX build as quantized GEMMs and ONNX Runtime CPU
fuses into ``com.microsoft.MatMulNBits`` (checked here with ORT 1.32: both forms fuse):

* int8: ``DequantizeLinear(int8 [K, N], fp32 scale [N], zero point 0, axis=1) -> MatMul``;
* int4: ``DequantizeLinear(int4 [K, N], fp32 scale [K/g, N], axis=0, block_size=g) -> MatMul``
  (uint4 + uint4 zero points ``[K/g, N]`` with ``--int4-zero-point``).

The DQ output feeds the MatMul directly (no Transpose / Reshape in between), so builders keep
the weights quantized instead of constant-folding them to float. Why this form: TensorRT's INT4
weight-only path is "INT4 weight constant + DQ prologue into a high-precision GEMM", and its
IDequantizeLayer rejects non-zero INT4 zero points (Torch-TensorRT's INT4 WOQ tutorial; DESIGN.md
records a TensorRT-RTX 1.7.1 build of exactly ``DQ(int4 [K, N], scale [K/64, N], axis=0,
block_size=64) -> MatMul`` at a quarter of the fp16 engine's bytes). Blocks run along K, the
reduction axis, as ONNX Runtime's MatMulNBits also wants.
"""

from __future__ import annotations

import numpy as np

from .graph import _init_array
from .weights import QuantizedWeight, to_tensors


def _remove_init(graph, name: str) -> None:
    # delete in place: rebuilding the repeated field copies every initializer (upb arenas
    # keep the copies alive: a 100M model ran out of memory that way)
    idx = next(i for i, t in enumerate(graph.initializer) if t.name == name)
    del graph.initializer[idx]


def replace_with_dq(model, init_name: str, qw: QuantizedWeight) -> str:
    """Replace float initializer ``init_name`` by ``qw`` + DequantizeLinear; every use of the
    initializer reads the DQ output instead. Returns that output's name."""
    from onnx import helper

    graph = model.graph
    tensors = to_tensors(qw, init_name)
    out = f"{init_name}_DequantizeLinear_Output"
    _remove_init(graph, init_name)
    graph.initializer.extend(tensors)
    attrs = {"axis": qw.axis}
    if qw.block_size is not None:
        attrs["block_size"] = qw.block_size
    dq = helper.make_node("DequantizeLinear", [t.name for t in tensors], [out], name=f"{init_name}_DequantizeLinear",
                          **attrs)
    first_use = None
    for idx, n in enumerate(graph.node):
        for i, inp in enumerate(n.input):
            if inp == init_name:
                n.input[i] = out
                first_use = idx if first_use is None else first_use
    graph.node.insert(first_use or 0, dq)
    return out


def add_weight_dq(model, init_name: str, axis: int) -> str:
    """int8 per-channel symmetric DQ on ``axis`` (1 for a MatMul weight, 0 for an embedding table)."""
    from .weights import int8_weight

    return replace_with_dq(model, init_name, int8_weight(_init_array(model.graph, init_name), axis))


def gather_from_head(model, gather_node: str, table: str, head_weight: str) -> None:
    """Tied embedding served by the quantized head: ``Gather(table [V, H], ids)`` becomes
    ``Transpose(Gather(DQ(head) [H, V], ids, axis=1), perm=[1, 2, 0])`` and the float table
    goes, so the file holds the matrix once."""
    from onnx import helper

    graph = model.graph
    node = next(n for n in graph.node if n.name == gather_node)
    rows = f"{gather_node}_from_head"
    node.input[0] = head_weight
    del node.attribute[:]
    node.attribute.extend([helper.make_attribute("axis", 1)])
    final = node.output[0]
    node.output[0] = rows
    idx = next(i for i, n in enumerate(graph.node) if n.name == gather_node)
    graph.node.insert(idx + 1, helper.make_node("Transpose", [rows], [final], name=f"{gather_node}_transpose",
                                                perm=[1, 2, 0]))
    if not any(table in n.input for n in graph.node):
        _remove_init(graph, table)
    # the DQ must come before the Gather in topological order
    dq_idx = next(i for i, n in enumerate(graph.node) if head_weight in n.output)
    if dq_idx > idx:
        dq = graph.node[dq_idx]
        copy = type(dq)()
        copy.CopyFrom(dq)
        del graph.node[dq_idx]
        graph.node.insert(idx, copy)


def int8_rows(q: str, scale: str, ids: str, out: str, prefix: str, *, hidden: int, blocks: int | None,
              rank: int) -> tuple[list, list]:
    """Nodes and int64 constants computing ``out = dequantize(q)[:, ids]`` moved last, without
    dequantizing the rest: ``ids`` of rank ``rank`` -> ``out`` [*ids, H], from an int8 head ``q``
    [H, V] with ``scale`` [V] (per channel, ``blocks`` None) or [H/g, V] (``blocks`` = H/g). The
    export's tied embedding (ids [B, S]) and the ONNX Runtime session's head rescoring (ids [B, P, k])
    both read the head's integers this way."""
    from onnx import helper, numpy_helper

    node, p = helper.make_node, prefix
    last = [*range(1, rank + 1), 0]                                                     # [H, *ids] -> [*ids, H]
    consts = [numpy_helper.from_array(np.array([-1], np.int64), f"{p}_axes")]
    nodes = [
        node("Gather", [q, ids], [f"{p}_q"], name=f"{p}_q", axis=1),                        # [H, *ids] int8
        node("Cast", [f"{p}_q"], [f"{p}_f"], name=f"{p}_cast", to=1),
        node("Transpose", [f"{p}_f"], [f"{p}_t"], name=f"{p}_t", perm=last),              # [*ids, H]
    ]
    if blocks is None:  # [*ids, H] * [*ids, 1]
        return nodes + [
            node("Gather", [scale, ids], [f"{p}_s"], name=f"{p}_s", axis=0),                # [*ids]
            node("Unsqueeze", [f"{p}_s", consts[0].name], [f"{p}_s1"], name=f"{p}_s1"),
            node("Mul", [f"{p}_t", f"{p}_s1"], [out], name=f"{p}_mul"),
        ], consts
    consts += [numpy_helper.from_array(np.array([0] * rank + [blocks, hidden // blocks], np.int64), f"{p}_blocked"),
               numpy_helper.from_array(np.array([0] * rank + [hidden], np.int64), f"{p}_rows")]
    return nodes + [  # [*ids, H/g, g] * [*ids, H/g, 1] -> [*ids, H]
        node("Reshape", [f"{p}_t", consts[1].name], [f"{p}_tb"], name=f"{p}_tb"),
        node("Gather", [scale, ids], [f"{p}_s"], name=f"{p}_s", axis=1),                    # [H/g, *ids]
        node("Transpose", [f"{p}_s"], [f"{p}_st"], name=f"{p}_st", perm=last),
        node("Unsqueeze", [f"{p}_st", consts[0].name], [f"{p}_s1"], name=f"{p}_s1"),
        node("Mul", [f"{p}_tb", f"{p}_s1"], [f"{p}_m"], name=f"{p}_mul"),
        node("Reshape", [f"{p}_m", consts[2].name], [out], name=f"{p}_rows"),
    ], consts


def gather_int8_rows(model, gather_node: str, table: str, head_weight: str) -> None:
    """Tied embedding served by an int8 head ``q [H, V]`` with ``scale [V]`` (per channel) or
    ``scale [H/g, V]`` (blocks of ``g`` along H): the rows of the token ids are gathered as
    integers and scaled (:func:`int8_rows`; no whole-table dequantization per step); the float
    table goes, so the file holds the matrix once."""
    graph = model.graph
    idx = next(i for i, n in enumerate(graph.node) if n.name == gather_node)
    node = graph.node[idx]
    q, scale = f"{head_weight}_quantized", f"{head_weight}_scale"
    dims = {t.name: [int(d) for d in t.dims] for t in graph.initializer if t.name in (q, scale)}
    new, consts = int8_rows(q, scale, node.input[1], node.output[0], f"{gather_node}_int8", hidden=dims[q][0],
                            blocks=dims[scale][0] if len(dims[scale]) == 2 else None, rank=2)
    graph.initializer.extend(consts)
    del graph.node[idx]
    for k, n in enumerate(new):
        graph.node.insert(idx + k, n)
    if not any(table in n.input for n in graph.node):
        _remove_init(graph, table)


def store_fp16(model, table: str) -> None:
    """Keep float table ``table`` in fp16 on disk behind a ``Cast(to=float)`` that every reader
    uses (runtimes fold it at load time): half the bytes of the largest float matrix left, at an
    fp16 rounding (~5e-4 relative) of values that are already float-only."""
    from onnx import helper, numpy_helper

    graph = model.graph
    arr = _init_array(graph, table)
    out = f"{table}_fp32"
    for n in graph.node:
        for i, inp in enumerate(n.input):
            if inp == table:
                n.input[i] = out
    idx = next(i for i, t in enumerate(graph.initializer) if t.name == table)
    graph.initializer[idx].CopyFrom(numpy_helper.from_array(arr.astype(np.float16), table))
    for k in [k for k, v in enumerate(graph.value_info) if v.name == table][::-1]:
        del graph.value_info[k]  # the exporter's float type annotation of the old initializer
    graph.node.insert(0, helper.make_node("Cast", [table], [out], name=f"{table}_cast", to=1))


__all__ = ["add_weight_dq", "gather_from_head", "gather_int8_rows", "int8_rows", "replace_with_dq", "store_fp16"]
