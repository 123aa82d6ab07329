"""Read an ONNX model's graph without its weights: big initializers become external-data
references to where their bytes already lie (in ``model.onnx`` itself, or its data file).

``onnx.load`` reads the whole file and parses it into a second copy (2x the weights at peak)
only for a graph rewrite to look at a few constants. :func:`load_skeleton` walks the
protobuf wire format instead (ModelProto field 7 = graph, GraphProto field 5 = initializer,
TensorProto field 9 = raw_data), seeks over every ``raw_data`` larger than ``inline_max_bytes``
and records its file offset and length as ONNX external data (``location`` = the model file's
name, ``offset``, ``length``). ONNX Runtime then reads those bytes from the original file (the
model and its external initializers folder given with
``session.model_external_initializers_file_folder_path``), so no weight is serialized again.
Initializers that are already external stay as they are, except small ones, which are read
in (a rewrite may need their values: inv_freq, shapes).
"""

from __future__ import annotations

import os
from pathlib import Path

_GRAPH = 7          # ModelProto.graph
_INITIALIZER = 5    # GraphProto.initializer
_RAW_DATA = 9       # TensorProto.raw_data


def _varint(f) -> int | None:
    shift = result = 0
    while True:
        b = f.read(1)
        if not b:
            if shift:
                raise ValueError("truncated varint")
            return None
        result |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            return result
        shift += 7


def _fields(f, end: int):
    """Yield (field number, wire type, tag bytes, payload start, payload end) up to ``end``;
    the caller may read or skip the payload (the generator seeks past it)."""
    while f.tell() < end:
        start = f.tell()
        tag = _varint(f)
        if tag is None:
            return
        num, wt = tag >> 3, tag & 7
        if wt == 0:
            _varint(f)
            yield num, wt, start, f.tell(), f.tell()
            continue
        if wt == 1:
            n = 8
        elif wt == 5:
            n = 4
        elif wt == 2:
            n = _varint(f)
        else:
            raise ValueError(f"unsupported protobuf wire type {wt}")
        payload = f.tell()
        yield num, wt, start, payload, payload + n
        f.seek(payload + n)


def _read(f, start: int, end: int) -> bytes:
    f.seek(start)
    return f.read(end - start)


def _tensor(f, start: int, end: int, location: str, inline_max_bytes: int):
    """One initializer: its header parsed, its raw_data inline (small) or an external reference."""
    import onnx

    header = bytearray()
    raw = None
    for num, wt, tag_start, p0, p1 in list(_fields(f, end)):
        if num == _RAW_DATA and wt == 2:
            raw = (p0, p1)
        else:
            header += _read(f, tag_start, p1)
    t = onnx.TensorProto.FromString(bytes(header))
    if raw is None:
        return t
    offset, length = raw[0], raw[1] - raw[0]
    if length <= inline_max_bytes:
        t.raw_data = _read(f, offset, raw[1])
        return t
    t.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v
    return t


def _load_small_external(t, base: Path, inline_max_bytes: int) -> None:
    import onnx
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    if not uses_external_data(t):
        return
    info = {e.key: e.value for e in t.external_data}
    if int(info.get("length", inline_max_bytes + 1)) <= inline_max_bytes:
        load_external_data_for_tensor(t, str(base))
        t.data_location = onnx.TensorProto.DEFAULT
        del t.external_data[:]


def load_skeleton(path, inline_max_bytes: int = 1 << 18):
    """The ModelProto at ``path`` with every initializer over ``inline_max_bytes`` left on disk as
    an external-data reference (relative to ``path``'s folder); memory use ~ the graph, not the
    weights."""
    import onnx

    path = Path(path)
    size = os.path.getsize(path)
    with open(path, "rb", buffering=1 << 16) as f:
        model_rest = bytearray()
        graph_rest = bytearray()
        tensors = []
        for num, wt, tag_start, p0, p1 in list(_fields(f, size)):
            if num != _GRAPH or wt != 2:
                model_rest += _read(f, tag_start, p1)
                continue
            f.seek(p0)
            for gnum, gwt, gtag, g0, g1 in list(_fields(f, p1)):
                if gnum == _INITIALIZER and gwt == 2:
                    f.seek(g0)
                    tensors.append(_tensor(f, g0, g1, path.name, inline_max_bytes))
                else:
                    graph_rest += _read(f, gtag, g1)
    model = onnx.ModelProto.FromString(bytes(model_rest))
    model.graph.ParseFromString(bytes(graph_rest))
    base = path.parent
    for t in tensors:
        _load_small_external(t, base, inline_max_bytes)
    model.graph.initializer.extend(tensors)
    return model


def _encode_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _length_delimited(field: int, length: int) -> bytes:
    return _encode_varint(field << 3 | 2) + _encode_varint(length)


def serialize_in_parts(model, big_bytes: int = 1 << 20) -> list[bytes]:
    """The encoding of ``model`` as parts whose concatenation parses to the same model: the model
    without its inline initializers over ``big_bytes``, then each of those framed as a ModelProto
    holding a graph holding that one initializer (protobuf merges a repeated singular message's
    occurrences and appends to repeated fields). ``SerializeToString`` of the whole grows one
    buffer by doubling: a session graph with 47 MB of inline tensors peaked at 4x its size there.
    Removes those initializers from ``model``."""
    g = model.graph
    big = [i for i, t in enumerate(g.initializer) if len(t.raw_data) > big_bytes]
    tensors = []
    for i in reversed(big):
        tensors.append(g.initializer[i].SerializeToString())
        del g.initializer[i]
    parts = [model.SerializeToString()]
    for t in reversed(tensors):
        inner = _length_delimited(_INITIALIZER, len(t))
        parts += [_length_delimited(_GRAPH, len(inner) + len(t)) + inner, t]
    return parts


__all__ = ["load_skeleton", "serialize_in_parts"]
