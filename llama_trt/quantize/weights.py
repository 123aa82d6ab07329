"""Weight quantizers (numpy) and their ONNX tensors.

* :func:`quantize_per_channel`: int8, symmetric, zero point 0, range [-127, 127], one scale per
  index of ``axis`` (the output channel ``N`` of a MatMul weight ``[K, N]``).
* :func:`int8_blocked`: int8, symmetric, in blocks of ``group`` rows along ``K`` (scale
  ``[K / group, N]``, no zero point): the lm head's form (a 49152-wide head whose rows differ
  within a channel by more than one scale covers; see schemes.HEAD_INT8_BLOCK).
* :func:`quantize_blocked`: int4 in blocks of ``group`` rows along ``K`` (ONNX blocked
  quantization: the scale has the weight's rank, ``[K / group, N]``, and ``DequantizeLinear``
  takes ``axis=0, block_size=group``). Symmetric: int4 in [-8, 7] with ``scale = amax / 7``
  (-8 is reachable only by rounding a clipped value, never by ``amax``); with zero points:
  uint4 in [0, 15], ``scale = (max - min) / 15``, ``zp = round(-min / scale)``. An optional
  ``clip`` (``[K / group, N]``, from AWQ's clipping search) caps ``|w|`` per block first.
* :func:`dequantize` is the ONNX ``DequantizeLinear`` formula written out, the reference the
  tests compare ONNX Runtime and a torch fake-quant against.

ONNX stores int4 two to a byte (``onnx.numpy_helper.from_array`` packs ``ml_dtypes.int4``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

QMAX8 = 127


@dataclass(frozen=True)
class QuantizedWeight:
    """``q`` (integer values held in int8/uint8), ``scale`` and optional ``zero_point``, with the
    ``DequantizeLinear`` attributes that reproduce the float weight."""

    q: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray | None
    axis: int
    block_size: int | None          # None: per-channel on ``axis``
    dtype: str                      # "int8" | "int4" | "uint4"

    @property
    def nbytes(self) -> int:
        bits = 8 if self.dtype == "int8" else 4
        zp = 0 if self.zero_point is None else self.zero_point.size * bits // 8
        return self.q.size * bits // 8 + self.scale.nbytes + zp


def quantize_per_channel(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 (zero point 0, range [-127, 127]) with one scale per index of ``axis``."""
    reduce = tuple(a for a in range(w.ndim) if a != axis % w.ndim)
    amax = np.abs(w).max(axis=reduce).astype(np.float32)
    scale = np.where(amax > 0, amax / QMAX8, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.rint(w / scale.reshape(shape)), -QMAX8, QMAX8).astype(np.int8)
    return q, scale


def int8_weight(w: np.ndarray, axis: int = 1) -> QuantizedWeight:
    q, scale = quantize_per_channel(w, axis)
    return QuantizedWeight(q, scale, np.zeros(scale.shape, np.int8), axis, None, "int8")


def block_scales(w: np.ndarray, group: int, qmax: int = QMAX8) -> np.ndarray:
    """``max |w| / qmax`` per block of ``group`` rows of ``w`` [K, N]: ``[K / group, N]`` (1 where a block is 0)."""
    k, n = w.shape
    if k % group:
        raise ValueError(f"group {group} does not divide {k}")
    amax = np.abs(w.astype(np.float32).reshape(k // group, group, n)).max(axis=1)
    return np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)


def int8_blocked(w: np.ndarray, group: int) -> QuantizedWeight:
    """Symmetric int8 in blocks of ``group`` rows of ``w`` [K, N] along K (round to nearest)."""
    scale = block_scales(w, group)
    q = np.clip(np.rint(w / np.repeat(scale, group, axis=0)), -QMAX8, QMAX8).astype(np.int8)
    return QuantizedWeight(q, scale, None, 0, group, "int8")


def quantize_blocked(w: np.ndarray, group: int, *, symmetric: bool = True,
                     clip: np.ndarray | None = None) -> QuantizedWeight:
    """int4 blocks of ``group`` rows of ``w`` [K, N] (K divisible by ``group``)."""
    k, n = w.shape
    if k % group:
        raise ValueError(f"group {group} does not divide {k}")
    blocks = w.astype(np.float32).reshape(k // group, group, n)
    if clip is not None:
        c = clip.astype(np.float32)[:, None, :]
        blocks = np.clip(blocks, -c, c)
    if symmetric:
        amax = np.abs(blocks).max(axis=1)
        scale = np.where(amax > 0, amax / 7.0, 1.0).astype(np.float32)
        q = np.clip(np.rint(blocks / scale[:, None, :]), -8, 7).astype(np.int8)
        zp = None
    else:
        lo, hi = np.minimum(blocks.min(axis=1), 0), np.maximum(blocks.max(axis=1), 0)
        scale = np.where(hi > lo, (hi - lo) / 15.0, 1.0).astype(np.float32)
        zp = np.clip(np.rint(-lo / scale), 0, 15).astype(np.uint8)
        q = np.clip(np.rint(blocks / scale[:, None, :]) + zp[:, None, :], 0, 15).astype(np.uint8)
    return QuantizedWeight(q.reshape(k, n), scale, zp, 0, group, "int4" if symmetric else "uint4")


def dequantize(qw: QuantizedWeight) -> np.ndarray:
    """ONNX ``DequantizeLinear``: ``(q - zero_point) * scale`` with the scale broadcast per
    channel (``axis``) or repeated ``block_size`` times along ``axis``."""
    q = qw.q.astype(np.float32)
    scale, zp = qw.scale, qw.zero_point
    zp = np.zeros_like(scale) if zp is None else zp.astype(np.float32)
    if qw.block_size is None:
        shape = [1] * q.ndim
        shape[qw.axis] = -1
        return (q - zp.reshape(shape)) * scale.reshape(shape)
    rep = lambda a: np.repeat(a, qw.block_size, axis=qw.axis)  # noqa: E731
    return (q - rep(zp)) * rep(scale)


def to_tensors(qw: QuantizedWeight, base: str) -> list:
    """TensorProtos ``{base}_quantized``, ``{base}_scale`` (and ``{base}_zero_point``)."""
    import ml_dtypes
    from onnx import numpy_helper

    kind = {"int8": np.int8, "int4": ml_dtypes.int4, "uint4": ml_dtypes.uint4}[qw.dtype]
    out = [numpy_helper.from_array(qw.q.astype(kind), f"{base}_quantized"),
           numpy_helper.from_array(qw.scale.astype(np.float32), f"{base}_scale")]
    if qw.zero_point is not None:
        out.append(numpy_helper.from_array(qw.zero_point.astype(kind), f"{base}_zero_point"))
    return out


__all__ = ["QuantizedWeight", "block_scales", "dequantize", "int8_blocked", "int8_weight", "quantize_blocked", "quantize_per_channel", "to_tensors"]
