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

:func:`int4_head_scan` then lets an int4 copy of the head find the candidates (``approx``), half the
bytes per token; the export's certificate decides whether it does (``quantize/kernel_form.py``).
"""

from __future__ import annotations

import numpy as np

from ...quantize.qdq import int8_rows
from ...quantize.weights import quantize_blocked, to_tensors
from .ort_graph import _attr, unshared_original
from .ort_pack import _initializer_array

#: logits per position recomputed in fp32 (the certificate's top-1 needs the first; KL gains from a few more)
RESCORE_K = 16
#: ... when an int4 copy in blocks of 32 / 64 along K found them (:func:`int4_head_scan`), whose error
#: reaches further down the ranking. SmolLM2 int4-awq (the int8 scan: KL 0.267 / perplexity x1.276):
#: blocks of 32 0.305 / x1.336 with 16, 0.297 / x1.325 with 32, 0.290 / x1.311 with 64; blocks of 64
#: 0.319 with 16 (misses the perplexity gate), 0.307 / x1.344 with 32, 0.302 / x1.331 with 48,
#: 0.299 / x1.323 with 64. A candidate costs little (a row of 576 int8); the blocks' scales cost more.
SCAN_RESCORE_K = {32: 32, 64: 64}
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


def int4_head_scan(model, weights_dir, block: int) -> bool:
    """The rescored int8 head's candidate search (``approx`` above) run on an int4 copy of the
    same weights: the int8 table dequantized and quantized again to symmetric int4 in blocks of
    ``block`` along K (``quantize.weights.quantize_blocked``), which ONNX Runtime fuses into a
    4-bit ``MatMulNBits`` reading half the bytes of the 8-bit one. The candidates are still
    recomputed from the int8 columns, so only the logits outside them carry the int4 error.
    Meant for int4 exports, whose layers carry far more error than this adds, and whose int8
    head is half the weight bytes a SmolLM2 int4 token reads. Runs after
    :func:`rescore_int8_head` and :func:`.ort_pack.transposed_gathers` (the int8 table then has
    no reader left but the head's own DequantizeLinear, which this replaces). The int4 copy is
    inline in the session graph. False when there is no rescored int8 head."""
    from onnx import helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    mm = producer.get(f"{PREFIX}.approx")
    dq = producer.get(mm.input[1]) if mm is not None else None
    if dq is None or dq.op_type != "DequantizeLinear" or any(i not in inits for i in dq.input[:2]):
        return False
    q = _initializer_array(inits[dq.input[0]], weights_dir)
    scale = _initializer_array(inits[dq.input[1]], weights_dir).astype(np.float32)
    if q.dtype != np.int8 or q.ndim != 2 or q.shape[0] % block:
        return False
    tensors = _int4_copy(q, scale, int(_attr(dq, "block_size", 0)) or None, block)
    del q, scale
    g.initializer.extend(tensors)
    scan = helper.make_node("DequantizeLinear", [t.name for t in tensors], [f"{PREFIX}.int4.w"],
                            name=f"{PREFIX}.int4.dq", axis=0, block_size=block)
    g.node.insert(next(i for i, n in enumerate(g.node) if n is mm), scan)
    mm.input[1] = scan.output[0]
    return True


def _int4_copy(q: np.ndarray, scale: np.ndarray, int8_block: int | None, block: int) -> list:
    """TensorProtos of symmetric int4 in blocks of ``block`` along K of the int8 weights ``q``
    [K, N] (``scale`` [N] per channel, or [K / int8_block, N]), one block of rows at a time: the
    fp32 values of a 49152-wide table would be 113 MB at once, at the session's first open. A
    block of rows is contiguous in the row-major [K, N] tensor (N even: no byte holds two blocks'
    values), so the blocks' packed bytes, concatenated, are the whole tensor's."""
    from onnx import TensorProto, numpy_helper

    k, n = q.shape
    packed, scales = [], []
    for r in range(0, k, block):
        part = q[r:r + block].astype(np.float32) * _int8_scales(scale, int8_block, r, block)
        qw = quantize_blocked(part, block)
        packed.append(to_tensors(qw, f"{PREFIX}.int4")[0].raw_data)  # onnx packs two int4 to a byte
        scales.append(qw.scale)
    weight = TensorProto(name=f"{PREFIX}.int4_quantized", dims=[k, n], data_type=TensorProto.INT4,
                         raw_data=b"".join(packed))
    return [weight, numpy_helper.from_array(np.concatenate(scales), f"{PREFIX}.int4_scale")]


def _int8_scales(scale: np.ndarray, int8_block: int | None, r: int, rows: int) -> np.ndarray:
    """The scales of rows ``r .. r + rows`` of an int8 weight: per channel ``[N]``, else ``[rows, N]``
    from its blocks of ``int8_block`` rows (``[K / int8_block, N]``)."""
    if not int8_block:
        return scale
    first, last = r // int8_block, (r + rows - 1) // int8_block
    return np.repeat(scale[first:last + 1], int8_block, axis=0)[r - first * int8_block:][:rows]


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


__all__ = ["PREFIX", "RESCORE_K", "SCAN_RESCORE_K", "int4_head_scan", "rescore_int8_head"]
