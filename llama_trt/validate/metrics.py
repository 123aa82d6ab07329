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


def position_metrics(ref_logits: np.ndarray, cand_logits: np.ndarray, targets) -> dict[str, np.ndarray]:
    """Per position (rows of [n, vocab] logits) for teacher forcing: KL(ref || cand), same
    argmax, and the negative log-likelihood of ``targets`` (next tokens) under each model.

    One log-softmax per side (float64): the certificate runs this over thousands of 49k-wide rows.
    """
    lp = log_softmax(ref_logits)
    lq = log_softmax(cand_logits)
    rows = np.arange(lp.shape[0])
    targets = np.asarray(targets, dtype=np.int64)
    return {
        "kl": np.maximum((np.exp(lp) * (lp - lq)).sum(axis=-1), 0.0),
        "top1": lp.argmax(axis=-1) == lq.argmax(axis=-1),
        "nll_ref": -lp[rows, targets],
        "nll_cand": -lq[rows, targets],
    }


def summarize_positions(kl: np.ndarray, top1: np.ndarray, nll_ref: np.ndarray, nll_cand: np.ndarray) -> dict[str, float]:
    """Mean / p99 / max KL, top-1 rate, both perplexities and their ratio (llama.cpp's statistics)."""
    ppl_ref = float(np.exp(np.mean(nll_ref)))
    ppl_cand = float(np.exp(np.mean(nll_cand)))
    return {
        "kl": float(np.mean(kl)), "kl_p99": float(np.percentile(kl, 99)), "kl_max": float(np.max(kl)),
        "top1": float(np.mean(top1)), "ppl_reference": ppl_ref, "ppl_candidate": ppl_cand,
        "ppl_ratio": ppl_cand / ppl_ref,
    }
