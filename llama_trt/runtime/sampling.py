"""Next-token selection on numpy logits: repetition penalty, temperature, top-k, top-p, greedy.

All functions take float logits of shape [vocab] or [batch, vocab] and never modify
their input. Filtered-out entries become -inf.
"""

from __future__ import annotations

import numpy as np


def _2d(logits, copy: bool = True) -> tuple[np.ndarray, bool]:
    x = np.array(logits, dtype=np.float32, copy=True) if copy else np.asarray(logits, dtype=np.float32)
    squeeze = x.ndim == 1
    return (x[None] if squeeze else x), squeeze


def apply_repetition_penalty(logits, seen, penalty: float) -> np.ndarray:
    """CTRL (Keskar et al. 2019) / Hugging Face: for every token already seen, a positive
    logit is divided by ``penalty`` and a negative one multiplied by it.

    ``seen``: bool mask [batch, vocab] (or [vocab]), or a list of id lists per row.
    """
    x, squeeze = _2d(logits)
    if penalty == 1.0:
        return x[0] if squeeze else x
    mask = _seen_mask(seen, x.shape)
    penalised = np.where(x > 0, x / penalty, x * penalty)
    x = np.where(mask, penalised, x)
    return x[0] if squeeze else x


def _seen_mask(seen, shape) -> np.ndarray:
    if isinstance(seen, np.ndarray) and seen.dtype == bool:
        return seen.reshape(shape)
    rows = [seen] if (len(seen) == 0 or np.isscalar(seen[0])) and shape[0] == 1 else seen
    mask = np.zeros(shape, dtype=bool)
    for r, ids in enumerate(rows):
        ids = np.asarray(ids, dtype=np.int64)
        mask[r, ids[(ids >= 0) & (ids < shape[1])]] = True
    return mask


def apply_top_k(logits, k: int) -> np.ndarray:
    """Keep the ``k`` largest logits per row (ties with the k-th are kept, as in HF); k <= 0: no-op."""
    x, squeeze = _2d(logits)
    if k and 0 < k < x.shape[-1]:
        kth = np.partition(x, -k, axis=-1)[:, -k][:, None]
        x = np.where(x < kth, -np.inf, x)
    return x[0] if squeeze else x


def apply_top_p(logits, p: float) -> np.ndarray:
    """Nucleus filtering (Holtzman et al. 2019): keep the smallest set of most likely tokens whose
    probability mass reaches ``p`` (always at least the top token); p >= 1: no-op."""
    x, squeeze = _2d(logits)
    if p < 1.0:
        order = np.argsort(-x, axis=-1, kind="stable")
        sorted_logits = np.take_along_axis(x, order, axis=-1)
        probs = softmax(sorted_logits)
        mass_before = np.cumsum(probs, axis=-1) - probs
        drop_sorted = mass_before >= p
        drop_sorted[:, 0] = False
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        x = np.where(drop, -np.inf, x)
    return x[0] if squeeze else x


def softmax(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    e = np.exp(x - m)
    return e / e.sum(axis=-1, keepdims=True)


def sample_next(logits, rng: np.random.Generator | None, *, temperature: float = 0.0, top_k: int = 0,
                top_p: float = 1.0, repetition_penalty: float = 1.0, seen=None) -> np.ndarray:
    """Pick one token per row of ``logits`` [batch, vocab] (or [vocab]); returns int64 ids.

    Order as in Hugging Face: repetition penalty, temperature, top-k, top-p, then draw.
    temperature == 0 means greedy (argmax after the repetition penalty).
    """
    x, squeeze = _2d(logits, copy=False)  # read only here: each filter below returns a new array
    if repetition_penalty != 1.0 and seen is not None:
        x = apply_repetition_penalty(x, seen, repetition_penalty)
    if temperature <= 0.0:
        ids = np.argmax(x, axis=-1).astype(np.int64)
        return ids[0] if squeeze else ids
    if rng is None:
        rng = np.random.default_rng()
    x = x / np.float32(temperature)
    x = apply_top_k(x, top_k)
    x = apply_top_p(x, top_p)
    probs = softmax(x)
    cdf = np.cumsum(probs, axis=-1)
    u = rng.random(x.shape[0]) * cdf[:, -1]
    ids = np.array([np.searchsorted(cdf[r], u[r], side="right") for r in range(x.shape[0])], dtype=np.int64)
    ids = np.minimum(ids, x.shape[-1] - 1)
    # never land on a filtered token through rounding at the cdf's flat end
    bad = ~np.isfinite(np.take_along_axis(x, ids[:, None], axis=-1)[:, 0])
    if bad.any():
        ids[bad] = np.argmax(x[bad], axis=-1)
    return ids[0] if squeeze else ids


__all__ = ["apply_repetition_penalty", "apply_top_k", "apply_top_p", "sample_next", "softmax"]
