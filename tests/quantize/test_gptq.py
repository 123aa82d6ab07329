"""GPTQ rounding (quantize/gptq.py) against the paper's algorithm written out plainly here, and
against round-to-nearest on the quantity it minimizes: a layer's output error on its inputs."""

from __future__ import annotations

import numpy as np
import pytest

from llama_trt.quantize.gptq import GptqSettings, channel_scales, gptq_int8, output_error


def _reference_gptq(w: np.ndarray, h: np.ndarray, damp: float, scales: np.ndarray | None = None) -> np.ndarray:
    """Frantar et al., Algorithm 1 without lazy batches or act order, in float64 numpy: quantize
    input channel i, then move the remaining channels by -err * Hinv[i, i:] / Hinv[i, i], with
    Hinv the upper Cholesky factor of (H + damp * mean(diag H) I)^-1. ``scales`` [K, N]: the grid
    of each weight (default: one per output channel)."""
    k = h.shape[0]
    hd = h + damp * np.mean(np.diag(h)) * np.eye(k)
    hinv = np.linalg.cholesky(np.linalg.inv(hd)).T          # upper: inv = U^T U
    if scales is None:
        scales = np.broadcast_to(channel_scales(w)[None, :], w.shape)
    wt = w.T.astype(np.float64).copy()                      # [N, K]
    q = np.zeros_like(wt)
    for i in range(k):
        scale = scales[i].astype(np.float64)
        q[:, i] = np.clip(np.rint(wt[:, i] / scale), -127, 127)
        err = (wt[:, i] - q[:, i] * scale) / hinv[i, i]
        wt[:, i:] -= np.outer(err, hinv[i, i:])
    return q.T


def _correlated_inputs(rng, rows: int, k: int) -> np.ndarray:
    """Activations with a few large, correlated channels (as LLM layer inputs have)."""
    base = rng.standard_normal((rows, k // 4))
    x = base @ rng.standard_normal((k // 4, k)) + 0.1 * rng.standard_normal((rows, k))
    x[:, :3] *= 20.0
    return x.astype(np.float32)


def test_matches_the_plain_algorithm():
    rng = np.random.default_rng(0)
    k, n = 48, 20
    x = _correlated_inputs(rng, 400, k)
    h = 2 * x.T.astype(np.float64) @ x / len(x)
    w = rng.standard_normal((k, n)).astype(np.float32) * 0.05
    q, scale = gptq_int8(w, h, GptqSettings(damp=0.1, block=16, act_order=False))  # blocks: same result
    ref = _reference_gptq(w, h, 0.1)
    # float64 on both sides; a value on a rounding boundary may land one step apart, nothing more
    assert np.abs(q - ref).max() <= 1 and np.mean(q != ref) < 0.01, np.mean(q != ref)
    np.testing.assert_array_equal(scale, channel_scales(w))
    assert q.dtype == np.int8 and np.abs(q).max() <= 127


@pytest.mark.parametrize("act_order", [False, True])
def test_output_error_is_below_round_to_nearest(act_order):
    rng = np.random.default_rng(1)
    k, n = 96, 64
    x = _correlated_inputs(rng, 2000, k)
    h = 2 * x.T.astype(np.float64) @ x / len(x)
    w = rng.standard_normal((k, n)).astype(np.float32) * 0.05
    q, scale = gptq_int8(w, h, GptqSettings(act_order=act_order))
    rtn = np.clip(np.rint(w / scale[None, :]), -127, 127)
    # measured directly on the inputs, not through output_error: ||X W - X Q||^2
    got = np.square(x @ w - x @ (q * scale[None, :])).mean()
    plain = np.square(x @ w - x @ (rtn * scale[None, :])).mean()
    assert got < 0.6 * plain, (got, plain)
    assert output_error(w, q, scale, h) == pytest.approx(2 * got * n, rel=1e-3)
    # the grid is TensorRT's: one symmetric scale per output channel, values in [-127, 127]
    assert np.allclose(scale, np.abs(w).max(0) / 127)


def test_never_seen_inputs_do_not_break_it():
    rng = np.random.default_rng(2)
    x = _correlated_inputs(rng, 300, 32)
    x[:, 5] = 0.0  # a dead channel: H has a zero row and column
    h = 2 * x.T.astype(np.float64) @ x / len(x)
    w = rng.standard_normal((32, 8)).astype(np.float32)
    q, scale = gptq_int8(w, h)
    assert np.isfinite(q).all() and q[5].tolist() == [0] * 8


@pytest.mark.parametrize("act_order", [False, True])
def test_blocked_grid_for_the_head(act_order):
    """The lm head's grid: one scale per 16 rows of K per output channel (max |w| / 127 of the
    block, fixed before rounding). Without act order the result is the plain algorithm's on that
    grid; with it, still well below round-to-nearest on the same grid."""
    rng = np.random.default_rng(3)
    k, n, g = 64, 24, 16
    x = _correlated_inputs(rng, 1500, k)
    h = 2 * x.T.astype(np.float64) @ x / len(x)
    w = rng.standard_normal((k, n)).astype(np.float32) * 0.05
    w[:16] *= 8.0  # blocks of very different ranges: what a per-channel scale wastes bits on
    want_scale = np.abs(w.reshape(k // g, g, n)).max(1) / 127
    q, scale = gptq_int8(w, h, GptqSettings(damp=0.1, block=16, act_order=act_order), group=g)
    np.testing.assert_allclose(scale, want_scale, rtol=1e-6)
    full = np.repeat(want_scale, g, axis=0)
    if not act_order:
        ref = _reference_gptq(w, h, 0.1, full)
        assert np.abs(q - ref).max() <= 1 and np.mean(q != ref) < 0.01, np.mean(q != ref)
    rtn = np.clip(np.rint(w / full), -127, 127)
    got = np.square(x @ w - x @ (q * full)).mean()
    plain = np.square(x @ w - x @ (rtn * full)).mean()
    assert got < 0.6 * plain, (got, plain)
    assert output_error(w, q, scale, h) == pytest.approx(2 * got * n, rel=1e-3)
