"""GroupQueryAttention sessions (ort_gqa + ort_shared_kv): an in-place KV cache that gives the
exported graph's logits in every pattern of steps the runtime and the server produce: batched
left-padded prefill, decode, a server join (several rows x several tokens on a non-empty cache:
run row by row), a prefill whose positions skip inside a row, and last-position-only logits.

The reference is the export run as it is (``fused_ops=False``: the function bodies, the export's
own attention and concatenated cache)."""

from __future__ import annotations

import numpy as np
import pytest

from llama_trt.runtime import GenerationConfig, generate_batch
from llama_trt.runtime.sessions.ort_session import OrtSession

ATOL = 1e-4


@pytest.fixture(scope="module")
def gqa_export(tmp_path_factory):
    """A tiny export whose head_dim (16) GroupQueryAttention's CPU kernel takes."""
    from llama_trt.checkpoint import create_tiny_checkpoint
    from llama_trt.exporter import export

    root = tmp_path_factory.mktemp("gqa")
    ckpt = create_tiny_checkpoint(root / "ckpt", seed=5, hidden_size=64, num_heads=4, num_kv_heads=2,
                                  intermediate_size=96, num_layers=2)
    export(ckpt, root / "fp32", dtype="fp32")
    return root / "fp32"


@pytest.fixture(scope="module")
def pair(gqa_export):
    from llama_trt.runtime.artifact import resolve_artifact

    art = resolve_artifact(gqa_export)
    fused, plain = OrtSession.from_artifact(art), OrtSession.from_artifact(art, fused_ops=False)
    assert fused.kv_layout == "shared-buffer", fused.describe()["fused_ops_rewrite"]
    assert plain.kv_layout == "concat"
    return fused, plain


def _both(pair, ids, mask, pos, **kw):
    fused, plain = pair
    return fused.step(ids, mask, pos, **kw), plain.step(ids, mask, pos, **kw)


def _left_padded(rng, vocab, lengths):
    b, width = len(lengths), max(lengths)
    ids = rng.integers(0, vocab, (b, width))
    mask = np.zeros((b, width), np.int64)
    for r, n in enumerate(lengths):
        mask[r, width - n:] = 1
    return ids, mask, np.clip(np.cumsum(mask, 1) - 1, 0, None)


def test_report_says_what_was_rewritten(pair):
    fused, _ = pair
    rewrite = fused.describe()["fused_ops_rewrite"]
    n = fused.config.num_layers
    assert rewrite["GroupQueryAttention(com.microsoft, RoPE inside, KV cache updated in place)"] == n
    assert rewrite["kv_layout"] == "shared-buffer"
    assert "in place" in fused.describe()["kv_cache"]


def test_batched_prefill_decode_and_server_join(pair):
    fused, plain = pair
    vocab = fused.config.vocab_size
    rng = np.random.default_rng(0)
    ids, mask, pos = _left_padded(rng, vocab, [9, 4, 6])
    for s in pair:
        s.reset(3, 64)
    got, ref = _both(pair, ids, mask, pos)
    valid = mask.astype(bool)
    np.testing.assert_allclose(got[valid], ref[valid], atol=ATOL, rtol=0)
    assert fused.kv_position_offsets().tolist() == [0, 5, 3]  # rows rotated by arange(9): their pads
    for _ in range(3):
        nxt = ref[:, -1].argmax(-1)[:, None]
        mask, pos = np.concatenate([mask, np.ones((3, 1), np.int64)], 1), pos[:, -1:] + 1
        got, ref = _both(pair, nxt, mask, pos)
        np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)
    # join: row 1 restarts with a 5-token prompt (its old keys masked), rows 0 and 2 feed one
    # token at the chunk's end: 3 rows x 5 tokens on a non-empty cache (the kernel takes 1 row)
    n = 5
    new_ids = np.zeros((3, n), np.int64)
    new_ids[:, -1] = ref[:, -1].argmax(-1)
    new_ids[1] = rng.integers(0, vocab, n)
    chunk = np.zeros((3, n), np.int64)
    chunk[:, -1] = 1
    chunk[1] = 1
    mask[1] = 0
    new_pos = np.zeros((3, n), np.int64)
    new_pos[:, -1] = pos[:, -1] + 1
    new_pos[1] = np.arange(n)
    mask = np.concatenate([mask, chunk], 1)
    got, ref = _both(pair, new_ids, mask, new_pos)
    np.testing.assert_allclose(got[chunk.astype(bool)], ref[chunk.astype(bool)], atol=ATOL, rtol=0)
    pos = new_pos[:, -1:]
    for _ in range(3):  # the joined row and the others keep decoding right
        nxt = ref[:, -1].argmax(-1)[:, None]
        mask, pos = np.concatenate([mask, np.ones((3, 1), np.int64)], 1), pos + 1
        got, ref = _both(pair, nxt, mask, pos)
        np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)


def test_prefill_whose_positions_skip_inside_a_row(pair):
    """No single offset per row: the session prefills row by row with the real positions."""
    fused, _ = pair
    rng = np.random.default_rng(1)
    ids = rng.integers(0, fused.config.vocab_size, (2, 6))
    mask = np.ones((2, 6), np.int64)
    pos = np.array([[0, 1, 2, 3, 4, 5], [0, 1, 2, 7, 8, 9]])
    for s in pair:
        s.reset(2, 32)
    got, ref = _both(pair, ids, mask, pos)
    np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)
    assert fused.kv_position_offsets().tolist() == [0, 0]
    for (gk, gv), (rk, rv) in zip(fused.kv_cache(), pair[1].kv_cache()):
        np.testing.assert_allclose(gk, rk, atol=ATOL, rtol=0)
        np.testing.assert_allclose(gv, rv, atol=ATOL, rtol=0)
    nxt = ref[:, -1].argmax(-1)[:, None]
    got, ref = _both(pair, nxt, np.ones((2, 7), np.int64), np.array([[6], [10]]))
    np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("rows", [1, 2])
def test_last_only_is_the_last_row_of_the_full_logits(pair, rows):
    fused, plain = pair
    rng = np.random.default_rng(2)
    ids, mask, pos = _left_padded(rng, fused.config.vocab_size, [7, 5][:rows])
    full = {}
    for s in pair:
        s.reset(rows, 32)
        full[s] = s.prefill(ids, mask, pos)
        s.reset(rows, 32)
        last = s.prefill(ids, mask, pos, last_only=True)
        assert last.shape == (rows, 1, fused.config.vocab_size)
        np.testing.assert_allclose(last[:, 0], full[s][:, -1], atol=1e-6, rtol=0)
    np.testing.assert_allclose(full[fused][:, -1], full[plain][:, -1], atol=ATOL, rtol=0)
    assert fused.describe()["fused_ops_rewrite"]["lm head on the positions in input 'llama_trt.logits_index' only"]


def test_generation_equals_the_plain_export(pair):
    fused, plain = pair
    prompts = [[3, 17, 33, 5, 90, 41, 7], [3, 60, 11, 44], [9]]
    gen = GenerationConfig(max_new_tokens=12, ignore_eos=True)
    assert [r.token_ids for r in generate_batch(fused, prompts, gen)] == \
        [r.token_ids for r in generate_batch(plain, prompts, gen)]


def test_small_head_dim_keeps_the_copying_cache(ort_session):
    """stories260K's head_dim 8 is not a multiple of 16: opset-23 Attention stays, and says why."""
    rewrite = ort_session.describe()["fused_ops_rewrite"]
    assert ort_session.kv_layout == "concat"
    assert any("multiple of 16" in n for n in rewrite.get("notes", []))
