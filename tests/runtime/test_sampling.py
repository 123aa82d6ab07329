"""Sampling functions on crafted logits: seeds, top-k / top-p support, repetition penalty."""

from __future__ import annotations

import numpy as np
import pytest

from llama_trt.errors import GenerationError
from llama_trt.runtime import GenerationConfig, apply_repetition_penalty, apply_top_k, apply_top_p, sample_next

DRAWS = 4000


def test_seeded_draws_reproducible():
    logits = np.random.default_rng(0).normal(size=(64, 50)).astype(np.float32)
    a = sample_next(logits, np.random.default_rng(3), temperature=0.9, top_k=10, top_p=0.9)
    b = sample_next(logits, np.random.default_rng(3), temperature=0.9, top_k=10, top_p=0.9)
    c = sample_next(logits, np.random.default_rng(4), temperature=0.9, top_k=10, top_p=0.9)
    assert a.dtype == np.int64 and np.array_equal(a, b) and not np.array_equal(a, c)


def test_greedy_is_argmax():
    logits = np.array([[0.1, 3.0, -2.0, 2.9], [5.0, 0.0, 0.0, 0.0]], np.float32)
    assert sample_next(logits, None, temperature=0.0).tolist() == [1, 0]
    assert int(sample_next(logits[0], None)) == 1


def test_top_k_never_leaves_the_k_largest():
    row = np.array([1.0, 4.0, 0.5, 3.5, 3.9, -1.0, 2.0, 3.0], np.float32)
    allowed = {1, 4, 3}
    ids = sample_next(np.tile(row, (DRAWS, 1)), np.random.default_rng(0), temperature=5.0, top_k=3)
    assert set(ids.tolist()) == allowed  # all three reachable, nothing else
    assert np.isneginf(apply_top_k(row, 3)[[0, 2, 5, 6, 7]]).all()


@pytest.mark.parametrize("p, allowed", [(0.75, {0, 1}), (0.85, {0, 1, 2}), (0.3, {0})])
def test_top_p_keeps_the_smallest_nucleus(p, allowed):
    probs = np.array([0.5, 0.3, 0.1, 0.06, 0.04])
    order = np.array([3, 0, 4, 1, 2])  # shuffle the vocabulary
    row = np.empty(5, np.float32)
    row[order] = np.log(probs)
    allowed = {int(order[i]) for i in allowed}
    ids = sample_next(np.tile(row, (DRAWS, 1)), np.random.default_rng(1), temperature=1.0, top_p=p)
    assert set(ids.tolist()) == allowed
    kept = np.flatnonzero(np.isfinite(apply_top_p(row, p)))
    assert set(kept.tolist()) == allowed


def test_repetition_penalty_ctrl_definition():
    logits = np.array([2.0, -1.0, 0.5, -3.0, 4.0], np.float32)
    out = apply_repetition_penalty(logits, [0, 1, 4, 4], 2.0)
    # seen 0, 1, 4: positive logits divided by 2, negative multiplied by 2; unseen untouched
    np.testing.assert_array_equal(out, np.array([1.0, -2.0, 0.5, -3.0, 2.0], np.float32))
    assert logits[0] == 2.0  # input not modified
    batch = np.stack([logits, logits])
    out = apply_repetition_penalty(batch, [[0], [3]], 1.5)
    np.testing.assert_allclose(out[0], [2.0 / 1.5, -1.0, 0.5, -3.0, 4.0])
    np.testing.assert_allclose(out[1], [2.0, -1.0, 0.5, -4.5, 4.0])


def test_repetition_penalty_matches_transformers():
    import torch
    from transformers import RepetitionPenaltyLogitsProcessor

    rng = np.random.default_rng(5)
    logits = rng.normal(size=(2, 30)).astype(np.float32)
    seen = rng.integers(0, 30, size=(2, 8))
    want = RepetitionPenaltyLogitsProcessor(1.3)(torch.from_numpy(seen), torch.from_numpy(logits.copy())).numpy()
    np.testing.assert_allclose(apply_repetition_penalty(logits, seen.tolist(), 1.3), want, rtol=1e-6)


def test_greedy_with_repetition_penalty_avoids_the_seen_top():
    logits = np.array([[3.0, 2.9, 0.0]], np.float32)
    assert sample_next(logits, None, repetition_penalty=1.2, seen=[[0]]).tolist() == [1]


@pytest.mark.parametrize("kwargs", [dict(max_new_tokens=0), dict(temperature=-1), dict(top_k=-1), dict(top_p=0.0),
                                    dict(top_p=1.5), dict(repetition_penalty=0.0)])
def test_generation_config_rejects_bad_values(kwargs):
    with pytest.raises(GenerationError):
        GenerationConfig(**kwargs)
