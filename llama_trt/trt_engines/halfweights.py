"""Build-time fp16 weight path for quantized exports whose activations are fp32.

A ``--quantize`` export keeps fp32 activations (ONNX Runtime CPU runs it that way), so in
the engine every weight that is not int8 / int4 stays fp32: for SmolLM2 the tied
embedding alone (114 MB fp32) outweighs all the int8 GEMM weights (106 MB), and the
int8 engine came out no smaller than the fp16 one. TensorRT-RTX stores each constant in
its type, so this pass changes the types the builder sees, not the export:

* ``DequantizeLinear(int8/int4 W, fp32 scale) -> MatMul`` gets an fp16 scale (the DQ
  output is fp16: the W8A16 / W4A16 weight-only form), and the MatMul runs in fp16 between
  ``Cast`` nodes on its activation input and its output (a MatMul whose activation also comes
  through a DequantizeLinear, an int8-sq W8A8 GEMM, is left as it is);
* large fp32 matrices read only by ``Gather`` (the embedding), ``MatMul`` (as B) or a
  ``Transpose`` feeding ``MatMul`` (the tied lm head) are stored in fp16, with the same
  ``Cast`` nodes around their readers.

Graph inputs, outputs and every other tensor keep their fp32 type, so the engine's I/O
contract (fp32 KV cache and logits) is the export's. The GEMMs accumulate in fp32 as in an
fp16 engine. Pure ONNX: tested with ONNX Runtime.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

MIN_TABLE_ELEMENTS = 1 << 16   # smaller fp32 matrices stay as they are
_INT_WEIGHT_TYPES = (2, 3, 21, 22)  # uint8, int8, uint4, int4
_FLOAT, _FLOAT16 = 1, 10


@dataclass(frozen=True)
class HalfWeights:
    """What the pass changed."""

    dequantize: int = 0     # DequantizeLinear nodes whose scale became fp16
    matmuls: int = 0        # MatMuls now computed in fp16
    gathers: int = 0        # Gathers reading an fp16 table
    tables: int = 0         # fp32 matrices stored as fp16
    bytes_saved: int = 0    # initializer bytes saved (fp32 -> fp16)
    int_gathers: int = 0    # Gathers of int8 rows given a unit-scale DequantizeLinear

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        return (f"fp16 weight path: {self.dequantize} DQ scales, {self.tables} float matrices "
                f"({self.bytes_saved / 1e6:.1f} MB saved), {self.matmuls} MatMuls and {self.gathers} Gathers in fp16, "
                f"{self.int_gathers} int8 row Gathers behind a unit-scale DQ")


def _consumers(graph) -> dict[str, list[tuple[Any, int]]]:
    out: dict[str, list[tuple[Any, int]]] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            out.setdefault(name, []).append((node, i))
    return out


def _plain_reader(node, idx: int, consumers) -> bool:
    """A reader of a float matrix that can take it in fp16 behind Casts."""
    if node.op_type == "Gather" and idx == 0:
        return True
    if node.op_type == "MatMul" and idx == 1:
        return True
    if node.op_type == "Transpose" and idx == 0:
        return all(n.op_type == "MatMul" and i == 1 for n, i in consumers.get(node.output[0], ()))
    return False


def _to_fp16(init) -> int:
    """Convert an fp32 initializer to fp16 in place; returns the bytes saved."""
    from onnx import numpy_helper

    arr = numpy_helper.to_array(init)
    half = numpy_helper.from_array(arr.astype(np.float16), init.name)
    init.CopyFrom(half)
    return arr.size * 2


def _fp16_copy(graph, inits, init) -> str:
    from onnx import numpy_helper

    name = f"{init.name}.fp16"
    if name not in inits:
        copy = numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), name)
        graph.initializer.append(copy)
        inits[name] = graph.initializer[-1]
    return name


def halve_float_weights(model, min_elements: int = MIN_TABLE_ELEMENTS) -> HalfWeights:
    """Rewrite ``model`` (a fp32-activation graph, edited in place) as described above."""
    from onnx import helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consumers = _consumers(graph)
    half: set[str] = set()     # tensors now fp16
    n_dq = n_tables = saved = 0

    producers = {o: n.op_type for n in graph.node for o in n.output}
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) < 2:
            continue
        w, s = inits.get(node.input[0]), inits.get(node.input[1])
        if w is None or s is None or w.data_type not in _INT_WEIGHT_TYPES or s.data_type != _FLOAT:
            continue
        if any(n.op_type == "MatMul" and producers.get(n.input[0]) == "DequantizeLinear"
               for n, _ in consumers.get(node.output[0], ())):
            continue  # W8A8 (int8-sq): TensorRT fuses Q/DQ on both inputs into an int8 GEMM; leave it whole
        if all(n.op_type == "DequantizeLinear" and i == 1 for n, i in consumers.get(s.name, ())):
            saved += _to_fp16(s) if s.name not in half else 0
        else:  # also read elsewhere (the int8 rows of a tied embedding): the DQ gets an fp16 copy
            node.input[1] = _fp16_copy(graph, inits, s)
        half.update((node.input[1], node.output[0]))
        n_dq += 1

    for name, init in inits.items():
        if init.data_type != _FLOAT or len(init.dims) != 2 or int(np.prod(init.dims)) < min_elements:
            continue
        readers = consumers.get(name, ())
        if readers and all(_plain_reader(n, i, consumers) for n, i in readers):
            saved += _to_fp16(init)
            half.add(name)
            n_tables += 1
            half.update(n.output[0] for n, _ in readers if n.op_type == "Transpose")

    n_tables += _unwrap_fp16_tables(graph, inits, consumers, half, min_elements)
    counts = _insert_casts(graph, half, helper)
    if half:
        keep = [vi for vi in graph.value_info if vi.name not in half]
        del graph.value_info[:]
        graph.value_info.extend(keep)
    return HalfWeights(n_dq, counts["MatMul"], counts["Gather"], n_tables, saved)


def _unwrap_fp16_tables(graph, inits, consumers, half: set[str], min_elements: int) -> int:
    """A table the export already stores fp16 behind ``Cast(to=float)`` (int8 schemes keep the
    tied table so): its readers take the fp16 initializer directly (the Cast goes), so TensorRT
    does not fold the Cast into a second, fp32 copy of the table."""
    n = 0
    for node in list(graph.node):
        if node.op_type != "Cast" or not node.input or node.input[0] not in inits:
            continue
        init = inits[node.input[0]]
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        if init.data_type != _FLOAT16 or to != _FLOAT or len(init.dims) != 2 or int(np.prod(init.dims)) < min_elements:
            continue
        readers = consumers.get(node.output[0], ())
        if not readers or not all(_plain_reader(r, i, consumers) for r, i in readers):
            continue
        for reader, i in readers:
            reader.input[i] = init.name
            consumers.setdefault(init.name, []).append((reader, i))
            if reader.op_type == "Transpose":
                half.add(reader.output[0])
        graph.node.remove(node)
        half.add(init.name)
        n += 1
    return n


def _insert_casts(graph, half: set[str], helper) -> dict[str, int]:
    """Cast activations to fp16 before, and results to fp32 after, each reader of a ``half``
    tensor; any other reader gets an fp32 copy of it."""
    casts: dict[str, str] = {}   # fp32 activation -> its fp16 Cast output (shared by q/k/v ...)
    back: dict[str, str] = {}    # fp16 tensor -> its fp32 Cast output (other readers)
    counts = {"MatMul": 0, "Gather": 0}
    new_nodes = []
    for node in graph.node:
        reads_half = [i for i, name in enumerate(node.input) if name in half]
        passes_through = node.op_type == "DequantizeLinear" or (node.op_type == "Transpose" and node.output[0] in half)
        if not reads_half or passes_through:
            new_nodes.append(node)
            continue
        if node.op_type == "MatMul" and reads_half == [1]:
            a = node.input[0]
            if a not in casts:
                casts[a] = f"{a}.fp16"
                new_nodes.append(helper.make_node("Cast", [a], [casts[a]], name=f"{a}.to_fp16", to=_FLOAT16))
            node.input[0] = casts[a]
        elif not (node.op_type == "Gather" and reads_half == [0]):
            for i in reads_half:
                src = node.input[i]
                if src not in back:
                    back[src] = f"{src}.fp32"
                    new_nodes.append(helper.make_node("Cast", [src], [back[src]], name=f"{src}.to_fp32", to=_FLOAT))
                node.input[i] = back[src]
            new_nodes.append(node)
            continue
        counts[node.op_type] += 1
        out = node.output[0]
        node.output[0] = f"{out}.fp16"
        new_nodes.append(node)
        new_nodes.append(helper.make_node("Cast", [node.output[0]], [out], name=f"{out}.to_fp32", to=_FLOAT))
    del graph.node[:]
    graph.node.extend(new_nodes)
    return counts


def dequantize_int_gathers(model) -> int:
    """``Gather(int8 table, ids) -> Cast`` (the int8 rows of a tied embedding whose quantized
    lm head holds the matrix) becomes ``Gather(DequantizeLinear(table, 1.0), ids) -> Cast``:
    TensorRT accepts an int8 constant only as the input of a DequantizeLinear (it refuses the
    build otherwise), and keeps it int8 in this form. Exact: a unit fp16 scale represents
    every int8 value. Returns the number of Gathers rewritten."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consumers = _consumers(graph)
    unit = "llama_trt.unit_scale"
    done: dict[str, str] = {}
    new_nodes, count = [], 0
    for node in graph.node:
        table = inits.get(node.input[0]) if node.op_type == "Gather" and node.input else None
        readers = consumers.get(node.output[0], ()) if table is not None else ()
        if (table is None or table.data_type not in (3, 22) or not readers
                or not all(n.op_type == "Cast" for n, _ in readers)):
            new_nodes.append(node)
            continue
        if table.name not in done:
            if unit not in inits:
                graph.initializer.append(numpy_helper.from_array(np.array(1.0, np.float16), unit))
                inits[unit] = graph.initializer[-1]
            done[table.name] = f"{table.name}.unit_dq"
            new_nodes.append(helper.make_node("DequantizeLinear", [table.name, unit], [done[table.name]],
                                              name=f"{table.name}.unit_dq"))
        node.input[0] = done[table.name]
        new_nodes.append(node)
        count += 1
    if count:
        del graph.node[:]
        graph.node.extend(new_nodes)
        gathered = {n.output[0] for n in new_nodes if n.op_type == "Gather" and n.input[0] in done.values()}
        keep = [vi for vi in graph.value_info if vi.name not in gathered]
        del graph.value_info[:]
        graph.value_info.extend(keep)
    return count


__all__ = ["HalfWeights", "MIN_TABLE_ELEMENTS", "dequantize_int_gathers", "halve_float_weights"]
