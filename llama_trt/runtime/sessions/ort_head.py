"""An int8 lm head whose best candidates are scored again with fp32 activations (ONNX Runtime CPU).

ONNX Runtime's CPU kernel for an int8 weight GEMM (``MatMulNBits`` at its default accuracy
level 4) rounds the activations to int8 as well, in blocks of 32 along K. For the lm head that
rounding is the head's whole error once its weights are int8 in blocks (SmolLM2: KL 0.00068 and
top-1 98.0% for the head alone, in a torch simulation; the blocked int8 weights alone: exact), and
it is enough to move a near-tie: int8-weight with the head int8 measured top-1 96.45% against
96.7% with the head float. Running the head at accuracy level 1 instead dequantizes the whole
49152 x 576 table on every call (slower than the fp32 head it replaces).

:func:`rescore_int8_head` keeps the fast kernel for every logit and recomputes the ``k`` largest
per position exactly as the graph defines them, ``x . dequantize(q)[:, v]`` in fp32:

    approx = MatMul(x, DequantizeLinear(q, scale))        # what ORT fuses into MatMulNBits
    top    = TopK(approx, k)                              # candidate token ids [B, P, k]
    rows   = Cast(Gather(q, top, axis=1)) * scale[.., top] # their int8 columns, dequantized
    logits = ScatterElements(approx, top, rows . x)       # those k logits replaced

Only the candidates' columns are read again (k x 576 int8 per position), from the same int8
table the embedding reads (both as rows of its transposed copy: ``ort_pack.transposed_gathers``).
The logits outside the top ``k`` keep the kernel's values; the argmax is the fp32 one whenever it ranks in the kernel's top ``k``.
ONNX Runtime sessions only: TensorRT computes the head with fp16 activations and needs none of it.
"""

from __future__ import annotations

import numpy as np

from ...quantize.qdq import int8_rows
from .ort_graph import _attr, unshared_original

#: logits per position recomputed in fp32 (the certificate's top-1 needs the first; KL gains from a few more)
RESCORE_K = 16
PREFIX = "llama_trt.head_rescore"


def _int8_head(g, inits):
    """(head MatMul, its DequantizeLinear, original q name, scale name, blocks) or None."""
    from onnx import TensorProto

    producer = {o: n for n in g.node for o in n.output}
    mm = producer.get("logits")
    if mm is None or mm.op_type != "MatMul" or mm.domain not in ("", "ai.onnx"):
        return None
    dq = producer.get(mm.input[1])
    if dq is None or dq.op_type != "DequantizeLinear" or dq.domain not in ("", "ai.onnx"):
        return None
    names = [_original(i, dq, inits) for i in dq.input if i]
    if any(n is None for n in names) or inits[names[0]].data_type != TensorProto.INT8 or len(inits[names[0]].dims) != 2:
        return None
    hidden = int(inits[names[0]].dims[0])
    sdims = [int(d) for d in inits[names[1]].dims]
    block, axis = int(_attr(dq, "block_size", 0)), int(_attr(dq, "axis", 1)) % 2
    if len(names) > 2 and not _all_zero(inits[names[2]]):
        return None  # int8 zero points other than 0: not the exports' symmetric form
    if not block and axis == 1 and len(sdims) == 1:
        return mm, dq, names[0], names[1], None
    if block and axis == 0 and len(sdims) == 2 and sdims[0] * block == hidden:
        return mm, dq, names[0], names[1], sdims[0]
    return None


def _original(name: str, dq, inits) -> str | None:
    """The initializer an ``_unshare_quantized_weights`` alias of the DQ's input stands for."""
    base = unshared_original(name, dq)
    return base if base in inits else (name if name in inits else None)


def _all_zero(tensor) -> bool:
    from onnx import numpy_helper

    if tensor.data_location == tensor.EXTERNAL:
        return False  # not read here; such a head is left as it is
    return not np.any(numpy_helper.to_array(tensor))


def rescore_int8_head(model, k: int = RESCORE_K) -> bool:
    """Rewrite the int8 lm head producing ``logits`` as described above; False if there is none."""
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    found = _int8_head(g, inits)
    if found is None:
        return False
    mm, dq, q, scale, blocks = found
    hidden, vocab = (int(d) for d in inits[q].dims)
    if vocab <= k:
        return False
    p = PREFIX
    x = mm.input[0]
    mm.output[0] = f"{p}.approx"
    rows, row_consts = int8_rows(q, scale, f"{p}.ids", f"{p}.w", p, hidden=hidden, blocks=blocks, rank=3)
    g.initializer.extend([*row_consts, *(numpy_helper.from_array(np.array([v], np.int64), f"{p}.{n}")
                                         for n, v in (("k", k), ("last", -1)))])
    node = helper.make_node
    nodes = [
        node("TopK", [f"{p}.approx", f"{p}.k"], [f"{p}.values", f"{p}.ids"], name=f"{p}.topk", axis=-1, sorted=0),
        *rows,                                                                               # [B, P, k, H]
        node("Unsqueeze", [x, f"{p}.last"], [f"{p}.x"], name=f"{p}.x"),                       # [B, P, H, 1]
        node("MatMul", [f"{p}.w", f"{p}.x"], [f"{p}.dot"], name=f"{p}.dot"),                 # [B, P, k, 1]
        node("Squeeze", [f"{p}.dot", f"{p}.last"], [f"{p}.exact"], name=f"{p}.exact"),
        node("ScatterElements", [f"{p}.approx", f"{p}.ids", f"{p}.exact"], ["logits"], name=f"{p}.scatter", axis=-1),
    ]
    at = next(i for i, n in enumerate(g.node) if n is mm) + 1
    for offset, n in enumerate(nodes):
        g.node.insert(at + offset, n)
    return True


__all__ = ["PREFIX", "RESCORE_K", "rescore_int8_head"]
