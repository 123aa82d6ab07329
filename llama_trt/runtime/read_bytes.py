"""Bytes one decode step reads, counted from the graph a session runs.

Every initializer is read whole once per token, at its stored size (int8 weights as int8,
their scales as stored), except where only rows of it are read: the data input of a
``Gather`` (an embedding table: one row per token) and the cos/sin caches of an opset-23
``RotaryEmbedding`` (one row per position). A table read both ways (a tied embedding that is
also the lm head) is counted whole, once. Initializers are read from the graph's headers
only (dims and type), so external weights are never loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: (op type, input index) pairs that read one row of their constant per token
_ROW_READS = {("Gather", 0), ("RotaryEmbedding", 1), ("RotaryEmbedding", 2)}


@dataclass(frozen=True)
class GraphReads:
    weight_bytes_per_token: int     # initializers read per decode token (batch 1)
    stored_weight_bytes: int        # all initializers at their stored size
    row_read_tensors: tuple[str, ...]  # tables read a row at a time


def _itemsize(data_type: int) -> int:
    from onnx import TensorProto, helper

    if data_type in (TensorProto.INT4, TensorProto.UINT4):
        return 1  # two per byte: counted as numel // 2 below
    return np.dtype(helper.tensor_dtype_to_np_dtype(data_type)).itemsize


def _nbytes(t) -> int:
    from onnx import TensorProto

    numel = int(np.prod(t.dims)) if len(t.dims) else 1
    if t.data_type in (TensorProto.INT4, TensorProto.UINT4):
        return (numel + 1) // 2
    return numel * _itemsize(t.data_type)


def graph_reads(model) -> GraphReads:
    """Count what one decode token of batch 1 reads from ``model``'s initializers."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    row_only: dict[str, bool] = {}
    for node in g.node:
        for idx, name in enumerate(node.input):
            if name in inits:
                row = (node.op_type, idx) in _ROW_READS and node.domain in ("", "ai.onnx")
                row_only[name] = row_only.get(name, True) and row
    total = per_token = 0
    rows = []
    for name, t in inits.items():
        size = _nbytes(t)
        total += size
        if name not in row_only:
            continue  # not read by any node
        if row_only[name] and len(t.dims) >= 1 and t.dims[0] > 0:
            per_token += size // int(t.dims[0])
            rows.append(name)
        else:
            per_token += size
    return GraphReads(per_token, total, tuple(rows))


__all__ = ["GraphReads", "graph_reads"]
