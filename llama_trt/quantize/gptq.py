"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers") for int8 per-output-channel weights (int8-weight).

The int8 grid stays TensorRT's: symmetric, zero point 0, one scale per output channel,
``scale = max|w| / 127`` of the (AWQ-scaled) weight, or (``group``, the lm head) one scale per
block of ``group`` input rows of each output channel, fixed before rounding from the weight
itself (AutoGPTQ's "static groups": the grid does not depend on the rounding order). What GPTQ changes is which grid point each
weight takes: input channels are rounded one at a time (largest Hessian diagonal first:
"act order"), and each rounding error is spread over the channels not yet rounded through the
inverse Hessian of the layer's calibration inputs, ``H = 2 X^T X / n``, so that the layer's
output ``X W`` moves as little as possible. The float model is unchanged; only the rounding is.

Inputs come from :func:`.stats.linear_hessians` (accumulated over every calibration token, not a
sample: a 1536-wide layer needs thousands of rows for a well-conditioned H). On SmolLM2 (torch
simulation of ONNX Runtime's level-4 kernels) AWQ + GPTQ with 8,192 Hessian tokens took the
certificate from KL 0.0039 / top-1 96.2% to 0.0032 / 97.0%; with 1,024 tokens it barely moved.

Runs in torch float64 (K <= a few thousand: a Cholesky of K x K per layer); the weights are
numpy ``[K, N]`` as the exporter stores MatMul weights (``y = x @ W``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .weights import block_scales

QMAX = 127
DAMP = 0.1          # of the mean Hessian diagonal (AutoGPTQ's default 0.01 was worse here: 135M, few tokens)
BLOCK = 128         # lazy-batch width of the error update (same result, fewer large updates)


@dataclass(frozen=True)
class GptqSettings:
    damp: float = DAMP
    block: int = BLOCK
    act_order: bool = True

    def to_dict(self) -> dict:
        return {"damp": self.damp, "block": self.block, "act_order": self.act_order,
                "grid": "int8 per output channel (the lm head: per block of K, static)"}


def channel_scales(w: np.ndarray) -> np.ndarray:
    """The fixed int8 grid: ``max |w| / 127`` per output channel (column of ``w`` [K, N])."""
    amax = np.abs(w).max(axis=0).astype(np.float32)
    return np.where(amax > 0, amax / QMAX, 1.0).astype(np.float32)


def _inverse_cholesky(h, damp: float):
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1`` (GPTQ's ``Hinv``)."""
    import torch

    k = h.shape[0]
    h = h + damp * torch.mean(torch.diag(h)) * torch.eye(k, dtype=h.dtype)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def grid(w: np.ndarray, group: int | None) -> np.ndarray:
    """The scales as stored: [N] per output channel, or [K / group, N] in blocks along K."""
    return channel_scales(w) if group is None else block_scales(w, group, QMAX)


def gptq_int8(w: np.ndarray, hessian: np.ndarray, settings: GptqSettings = GptqSettings(),
              group: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(q int8 [K, N], scale fp32)`` for MatMul weight ``w`` [K, N] whose inputs have Hessian
    ``hessian`` [K, K]; ``q * scale`` (per channel [N], or [K / group, N] in blocks along K)
    approximates ``w`` on the layer's inputs."""
    import torch

    scale = grid(w, group)
    wt = torch.from_numpy(np.ascontiguousarray(w.T, dtype=np.float64))    # [N, K]: rows = output channels
    h = torch.from_numpy(np.asarray(hessian, dtype=np.float64)).clone()
    k = wt.shape[1]
    dead = torch.diag(h) == 0                       # inputs never seen: any value rounds the same
    h[dead, dead] = 1.0
    wt[:, dead] = 0.0
    perm = torch.argsort(torch.diag(h), descending=True) if settings.act_order else torch.arange(k)
    wt, h = wt[:, perm], h[perm][:, perm]
    hinv = _inverse_cholesky(h, settings.damp)
    # [N, groups] (per channel: 1 group); input channel perm[i] rounds on the scales of its group
    s = torch.from_numpy(np.ascontiguousarray(scale.T if group else scale[:, None], dtype=np.float64))
    col_group = (perm // group if group else torch.zeros_like(perm)).tolist()
    q = torch.zeros_like(wt)
    for i1 in range(0, k, settings.block):
        i2 = min(i1 + settings.block, k)
        w1, err = wt[:, i1:i2].clone(), torch.zeros(wt.shape[0], i2 - i1, dtype=wt.dtype)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i:i + 1]
            gi = col_group[i1 + i]
            si = s[:, gi:gi + 1]
            qi = torch.clamp(torch.round(col / si), -QMAX, QMAX)
            q[:, i1 + i] = qi[:, 0]
            e = (col - qi * si) / h1[i, i]
            w1[:, i:] -= e @ h1[i:i + 1, i:]
            err[:, i] = e[:, 0]
        wt[:, i2:] -= err @ hinv[i1:i2, i2:]
    q = q[:, torch.argsort(perm)]
    return np.ascontiguousarray(q.T.numpy().astype(np.int8)), scale


def output_error(w: np.ndarray, q: np.ndarray, scale: np.ndarray, hessian: np.ndarray) -> float:
    """``tr((W - Q)^T H (W - Q))``: the layer's mean squared output error times 2 on its inputs.
    ``scale`` [N] per channel or [K / g, N] in blocks along K."""
    full = scale[None, :] if scale.ndim == 1 else np.repeat(scale, w.shape[0] // scale.shape[0], axis=0)
    d = (w.astype(np.float64) - q.astype(np.float64) * full.astype(np.float64))
    return float(np.sum(d * (np.asarray(hessian, np.float64) @ d)))


__all__ = ["GptqSettings", "channel_scales", "gptq_int8", "grid", "output_error"]
