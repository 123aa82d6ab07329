"""LLM-level metrics on logits (numpy, float64): top-1, KL, cosine, perplexity, greedy agreement."""

from __future__ import annotations

import numpy as np


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    z = x - m
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def kl_divergence(ref_logits: np.ndarray, cand_logits: np.ndarray) -> np.ndarray:
    """KL(softmax(ref) || softmax(cand)) per position (last axis = vocab), in nats."""
    lp = log_softmax(ref_logits)
    lq = log_softmax(cand_logits)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)
    return np.maximum(kl, 0.0)  # rounding can give -1e-17


def top1_matches(ref_logits: np.ndarray, cand_logits: np.ndarray) -> np.ndarray:
    return np.argmax(ref_logits, axis=-1) == np.argmax(cand_logits, axis=-1)


def cosine_similarity(ref_logits: np.ndarray, cand_logits: np.ndarray) -> np.ndarray:
    a = np.asarray(ref_logits, dtype=np.float64)
    b = np.asarray(cand_logits, dtype=np.float64)
    num = (a * b).sum(axis=-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return num / np.maximum(den, 1e-300)


def perplexity(logits: np.ndarray, tokens) -> float:
    """exp(mean NLL of tokens[1:] given the logits at positions [:-1]); logits [seq, vocab]."""
    tokens = np.asarray(tokens, dtype=np.int64)
    lp = log_softmax(np.asarray(logits)[: len(tokens) - 1])
    nll = -lp[np.arange(len(tokens) - 1), tokens[1:]]
    return float(np.exp(nll.mean()))


def greedy_agreement(reference: list[int], candidate: list[int]) -> tuple[float, int | None]:
    """(fraction of steps with the same token, first step where they differ or None)."""
    n = max(len(reference), 1)
    same = [a == b for a, b in zip(reference, candidate)]
    first = next((i for i, s in enumerate(same) if not s), None)
    if first is None and len(reference) != len(candidate):
        first = min(len(reference), len(candidate))
    return sum(same) / n, first
