"""Pack quantized projections that read one activation (q/k/v) into one weight.

ONNX Runtime's CPU kernel for a weight-only quantized GEMM (``MatMulNBits``, made by its
``DequantizeLinear -> MatMul`` fusion) quantizes its activation to int8 on every call (the
default accuracy level 4) and pays a fixed cost per call. Three calls for q, k and v instead of
one cost SmolLM2 int4 about 2 ms of a 7 ms decode step (211 ``MatMulNBits`` per step against
onnxruntime-genai's 151, which packs q/k/v when it builds its model).

:func:`pack_quantized_matmuls` concatenates the quantized tensors of such a group along N, in
numpy, and writes them into the session graph itself (inline, so they live in the cached graph,
not in the export folder): one ``DequantizeLinear -> MatMul`` plus a ``Split`` restoring the
original outputs. int4 is unpacked to one value a byte, concatenated and packed again by
``onnx.numpy_helper``; the stored values are bit-identical to the export's, so the dequantized
weights are too. Only ONNX Runtime sessions see this graph; the export (and TensorRT) do not.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...quantize.schemes import INT8_KERNEL_BLOCKS
from .ort_graph import _attr, _splice, readers, unshared_original, use_ms_domain

#: projections of one activation packed into one GEMM when there are at least this many: q/k/v
#: (feeding GroupQueryAttention packed, without a Split), not gate/up (2): their Split cost more than
#: the second GEMM call saved (SmolLM2 fp32 decode 44.8 -> 46.4 tok/s unpacked; int4 and int8 the same)
PACK_MIN = 3


def _initializer_array(tensor, weights_dir: Path | None) -> np.ndarray:
    """The value of ``tensor``, reading external data from ``weights_dir`` (left untouched)."""
    from onnx import numpy_helper
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    if uses_external_data(tensor):
        if weights_dir is None:
            raise ValueError(f"{tensor.name} lies in an external file and no weights folder was given")
        tensor = type(tensor).FromString(tensor.SerializeToString())
        load_external_data_for_tensor(tensor, str(weights_dir))
        tensor.data_location = tensor.DEFAULT
        del tensor.external_data[:]
    return numpy_helper.to_array(tensor)


def _dq_signature(dq, inits) -> tuple | None:
    """What must agree for DQs to share one tensor: element types, ranks, axis, block size."""
    from onnx import helper

    if dq.op_type != "DequantizeLinear" or dq.domain not in ("", "ai.onnx"):
        return None
    if any(i not in inits for i in dq.input if i) or len(inits[dq.input[0]].dims) != 2:
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
    axis, block = int(attrs.get("axis", 1)), int(attrs.get("block_size", 0))
    if axis not in (0, 1, -1, -2) or (block and axis not in (0, -2)) or (not block and axis in (0, -2)):
        return None  # per channel along N, or blocks along K: anything else is left alone
    types = tuple(inits[i].data_type for i in dq.input if i)
    ranks = tuple(len(inits[i].dims) for i in dq.input if i)
    return types, ranks, axis % 2, block, len([i for i in dq.input if i]), int(inits[dq.input[0]].dims[0])


def drop_zero_int8_zero_points(model, weights_dir: Path | None) -> int:
    """Remove the int8 zero-point input of ``DequantizeLinear`` nodes whose zero points are all 0
    (the default). The exports write them for TensorRT's sake; ONNX Runtime's MatMulNBits
    fusion turns an explicit zero point into an asymmetric kernel (uint8 values + zero points)
    and a missing one into the symmetric kernel onnxruntime-genai's int8 models use."""
    from onnx import TensorProto

    inits = {t.name: t for t in model.graph.initializer}
    done = 0
    for n in model.graph.node:
        if n.op_type != "DequantizeLinear" or n.domain not in ("", "ai.onnx") or len(n.input) < 3 or not n.input[2]:
            continue
        zp = inits.get(n.input[2])
        if zp is None or zp.data_type != TensorProto.INT8:
            continue
        if np.any(_initializer_array(zp, weights_dir)):
            continue
        del n.input[2]
        done += 1
    return done


def int8_kernel_blocks(model, weights_dir: Path | None, block: int) -> int:
    """Per-channel int8 weights (``DequantizeLinear(q int8 [K, N], scale [N])`` feeding a MatMul's
    weight) rewritten as the same values in blocks of ``block`` along K: the channel's scale
    repeated, ``[ceil(K / block), N]``, inline in the session graph. The dequantized weights are
    the same numbers, so a float computation is unchanged. What moves is ONNX Runtime's kernel: it
    fuses such a DQ into an 8-bit ``MatMulNBits`` in blocks of 32, and at its default accuracy
    level it rounds the activation to int8 with one scale per block of the same size; wider
    blocks read half or a quarter of the scales and do fewer int32 -> float conversions (SmolLM2
    int8-weight, decode on 2 threads: +3-7% at 64) at a coarser activation rounding (its
    certificate: KL 0.0033 -> 0.0039). Which block an export runs with is chosen when it is
    quantized, by its own accuracy certificate (``quantize/kernel_form.py``). Zero points (left
    only where they are non-zero) keep a DQ as it is. Returns how many DQs were rewritten."""
    from onnx import TensorProto, helper, numpy_helper

    if block not in INT8_KERNEL_BLOCKS:
        raise ValueError(f"int8 kernel block must be one of {INT8_KERNEL_BLOCKS}, got {block}")
    if block == 32:
        return 0
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    reading = readers(g)
    done = 0
    for dq in [n for n in g.node if n.op_type == "DequantizeLinear" and n.domain in ("", "ai.onnx")]:
        q, scale = (inits.get(dq.input[0]), inits.get(dq.input[1])) if len(dq.input) == 2 else (None, None)
        if q is None or scale is None or q.data_type != TensorProto.INT8 or len(q.dims) != 2:
            continue
        if _attr(dq, "block_size", 0) or int(_attr(dq, "axis", 1)) % 2 != 1 or list(scale.dims) != [q.dims[1]]:
            continue
        users = reading.get(dq.output[0], [])
        if not users or any(u.op_type != "MatMul" or u.input[1] != dq.output[0] for u in users):
            continue
        k = int(q.dims[0])
        values = _initializer_array(scale, weights_dir).astype(np.float32)
        name = f"{dq.input[1]}.block{block}"
        g.initializer.append(numpy_helper.from_array(np.repeat(values[None, :], -(-k // block), axis=0), name))
        dq.input[1] = name
        del dq.attribute[:]
        dq.attribute.extend([helper.make_attribute("axis", 0), helper.make_attribute("block_size", block)])
        done += 1
    return done


def gather_quantized_rows(model, weights_dir: Path | None) -> int:
    """A tied embedding read from the int4 lm head's *dequantized* table (the export's
    ``Transpose(Gather(DequantizeLinear(q [H, V], s [H/g, V]), ids, axis=1))``) makes ONNX Runtime
    dequantize all 49152 x 576 values of SmolLM2's table every step (and keeps the head's DQ from
    fusing into ``MatMulNBits``): 5 tok/s. It becomes ``com.microsoft.GatherBlockQuantized`` over
    the table transposed to [V, H] (the same int4 values and scales, blocks along H), which
    dequantizes only the looked-up rows; the head keeps its own DQ -> MatMulNBits. The transposed
    copy (half a byte per weight) is inline in the session graph."""
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    reading = readers(g)
    replace, drop = {}, set()
    for dq in [n for n in g.node if n.op_type == "DequantizeLinear" and n.domain in ("", "ai.onnx")]:
        attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
        block = int(attrs.get("block_size", 0))
        if not block or int(attrs.get("axis", 1)) % 2 != 0 or any(i not in inits for i in dq.input if i):
            continue
        if len(inits[dq.input[0]].dims) != 2 or inits[dq.input[0]].data_type not in (21, 22):  # uint4, int4
            continue
        gathers = [n for n in reading.get(dq.output[0], []) if n.op_type == "Gather"]
        for gather in gathers:
            axis = next((helper.get_attribute_value(a) for a in gather.attribute if a.name == "axis"), 0)
            users = reading.get(gather.output[0], [])
            tr = users[0] if len(users) == 1 and users[0].op_type == "Transpose" else None
            perm = None if tr is None else [helper.get_attribute_value(a) for a in tr.attribute if a.name == "perm"]
            if axis != 1 or perm != [[1, 2, 0]]:
                continue
            base = f"{dq.name or dq.output[0]}.rows"
            names = []
            for k, name in enumerate(i for i in dq.input if i):
                arr = _initializer_array(inits[name], weights_dir)
                g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(arr.T), f"{base}.in{k}"))
                names.append(f"{base}.in{k}")
            inputs = [names[0], gather.input[1], names[1]] + names[2:]
            # no ``bits`` attribute: 4 is its default for int4 / uint4 data, and ONNX Runtime 1.22 (our
            # minimum) rejects the attribute ("Unrecognized attribute: bits"; it came with 8-bit data)
            replace[id(gather)] = [helper.make_node(
                "GatherBlockQuantized", inputs, [tr.output[0]], name=base, domain="com.microsoft",
                gather_axis=0, quantize_axis=1, block_size=block)]
            drop.add(id(tr))
    if replace:
        _splice(g, replace, drop)
        use_ms_domain(model)
    return len(replace)


def gather_rows_before_cast(model) -> int:
    """A tied float table stored in fp16 and read through ``Cast`` to fp32 by both the embedding
    ``Gather`` and the lm head (int8-weight with the head kept float) makes ONNX Runtime hold the
    folded fp32 table for the Gather next to the head's own transposed, prepacked fp32 copy
    (SmolLM2: 113 MB more resident). The Gather reads the fp16 table itself and casts only the
    rows it looked up (the same values: a Cast commutes with a Gather); the head's Cast is left to
    ORT's constant folding. Returns how many Gathers were moved."""
    from onnx import TensorProto, helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    reading = readers(g)
    replace = {}
    for cast in [n for n in g.node if n.op_type == "Cast" and n.domain in ("", "ai.onnx")]:
        table = inits.get(cast.input[0])
        users = reading.get(cast.output[0], [])
        if table is None or table.data_type not in (TensorProto.FLOAT16, TensorProto.BFLOAT16) or len(users) < 2:
            continue
        for gather in users:
            if gather.op_type != "Gather" or gather.domain not in ("", "ai.onnx") or gather.input[0] != cast.output[0]:
                continue
            rows = f"{gather.output[0]}.{table.name}.rows"
            replace[id(gather)] = [
                helper.make_node("Gather", [table.name, gather.input[1]], [rows], name=rows,
                                 axis=int(_attr(gather, "axis", 0))),
                helper.make_node("Cast", [rows], [gather.output[0]], name=f"{rows}.cast", to=int(_attr(cast, "to"))),
            ]
    if replace:
        _splice(g, replace)
    return len(replace)


def pack_quantized_matmuls(model, weights_dir: Path | None) -> str:
    """MatMuls ``x @ DequantizeLinear(Wq_i, s_i[, z_i])`` sharing ``x`` and the DQ form -> one;
    returns ``"before -> after"`` (quantized MatMuls)."""
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    reading = readers(g)
    groups: dict[tuple, list] = {}
    for n in g.node:
        if n.op_type != "MatMul" or n.domain not in ("", "ai.onnx"):
            continue
        dq = producer.get(n.input[1])
        sig = None if dq is None or len(reading.get(dq.output[0], [])) != 1 else _dq_signature(dq, inits)
        if sig is not None:
            groups.setdefault((n.input[0], sig), []).append((n, dq))
    before = sum(len(v) for v in groups.values())
    replace: dict[int, list] = {}
    drop: set[int] = set()
    for (x, sig), members in groups.items():
        if len(members) < PACK_MIN:
            continue
        k = len(replace)
        base = f"llama_trt.packed_quantized.{k}"
        slots = len(members[0][1].input)
        for slot in range(slots):
            parts = [_initializer_array(inits[dq.input[slot]], weights_dir) for _, dq in members]
            g.initializer.append(numpy_helper.from_array(np.concatenate(parts, axis=-1), f"{base}.in{slot}"))
        sizes = [int(inits[dq.input[0]].dims[1]) for _, dq in members]
        g.initializer.append(numpy_helper.from_array(np.array(sizes, dtype=np.int64), f"{base}.split"))
        first_dq = members[0][1]
        dq = helper.make_node("DequantizeLinear", [f"{base}.in{s}" for s in range(slots)], [f"{base}.weight"],
                              name=f"{base}.dq")
        dq.attribute.extend(first_dq.attribute)
        replace[id(members[0][0])] = [
            dq,
            helper.make_node("MatMul", [x, f"{base}.weight"], [f"{base}.out"], name=f"{base}.matmul"),
            helper.make_node("Split", [f"{base}.out", f"{base}.split"], [mm.output[0] for mm, _ in members],
                             name=f"{base}.split", axis=-1),
        ]
        drop.update(id(mm) for mm, _ in members[1:])
        drop.update(id(d) for _, d in members)
    if not replace:
        return f"{before} -> {before}"
    _splice(g, replace, drop)
    return f"{before} -> {before - sum(len(m) - 1 for m in groups.values() if len(m) >= PACK_MIN)}"


def transposed_gathers(model, weights_dir: Path | None) -> int:
    """Row gathers from a quantized head's tensors instead of column gathers.

    A tied int8 table is stored as the head needs it, ``q [H, V]`` (and its block scales
    ``[H/g, V]``), so the embedding and the head rescoring (:mod:`.ort_head`) read columns:
    ``Transpose(Cast(Gather(q, ids, axis=1)))``. ONNX Runtime's Gather copies such a column
    element by element: SmolLM2's rescoring (16 columns of 576) took 0.40 ms of a 10 ms int8
    decode step, the embedding and its scales 0.05 ms more (ORT profiler; a row of the same
    table: 0.02 ms). Each such chain becomes ``Cast(Gather(qT, ids, axis=0))`` on one transposed
    copy of the tensor, inline in the session graph (same values, so the same results); the
    export's tensor then has one reader left, the head's own ``DequantizeLinear``
    (``_unshare_quantized_weights`` gave it its own entry), which ORT fuses into ``MatMulNBits``
    and prepacks. Only tensors a DequantizeLinear also reads are transposed. Returns how many
    Gathers were rewritten."""
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    reading = readers(g)
    # tensors whose DequantizeLinear reads its own entry (``_unshare_quantized_weights``)
    shared = {unshared_original(i, n) for n in g.node if n.op_type == "DequantizeLinear" for i in n.input} - {None}
    copies: dict[str, str] = {}
    replace, drop = {}, set()
    for gather in [n for n in g.node if n.op_type == "Gather" and n.domain in ("", "ai.onnx")]:
        table = inits.get(gather.input[0])
        if table is None or table.name not in shared or len(table.dims) != 2 or int(_attr(gather, "axis", 0)) != 1:
            continue
        chain, users = [], reading.get(gather.output[0], [])
        while len(users) == 1 and users[0].op_type == "Cast":
            chain.append(users[0])
            users = reading.get(users[0].output[0], [])
        if len(users) != 1 or users[0].op_type != "Transpose":
            continue
        tr = users[0]
        perm = list(_attr(tr, "perm", []))
        if perm != [*range(1, len(perm)), 0]:
            continue
        if table.name not in copies:
            copies[table.name] = f"{table.name}.rows"
            arr = _initializer_array(table, weights_dir)
            g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(arr.T), copies[table.name]))
        rows = helper.make_node("Gather", [copies[table.name], gather.input[1]], [gather.output[0]],
                                name=f"{gather.name or gather.output[0]}.rows", axis=0)
        (chain[-1] if chain else rows).output[0] = tr.output[0]  # the Transpose's readers read the rows
        replace[id(gather)] = [rows]
        drop.add(id(tr))
    if replace:
        _splice(g, replace, drop)
    return len(replace)


__all__ = ["drop_zero_int8_zero_points", "gather_quantized_rows", "gather_rows_before_cast", "int8_kernel_blocks",
           "pack_quantized_matmuls", "transposed_gathers"]
