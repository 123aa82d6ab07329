"""ONNX Runtime on the exported file vs transformers (and vs our torch model).

Prefill a left-padded batch of two prompts of different lengths (empty past), then decode
several steps feeding the presents back as past. transformers recomputes the whole
sequence each step (no cache), so the reference is independent of our cache handling.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llama_trt.exporter.feeds import build_feeds, positions_from_mask, split_outputs

from .conftest import FP16_REPORT, VARIANTS

DECODE_STEPS = 4


def hf_model(path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def prompts(vocab: int, seed: int = 0):
    """Batch 2: lengths 7 and 4, the second left-padded with 3 pad tokens (id 0)."""
    g = np.random.default_rng(seed)
    ids = g.integers(3, vocab, size=(2, 7)).astype(np.int64)
    mask = np.ones((2, 7), np.int64)
    ids[1, :3] = 0
    mask[1, :3] = 0
    return ids, mask


def reference_logits(ref, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Full recompute with explicit mask and positions (cumsum(mask) - 1)."""
    pos = positions_from_mask(mask, ids.shape[1])
    with torch.no_grad():
        out = ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                  position_ids=torch.from_numpy(pos), use_cache=False)
    return out.logits.float().numpy()


def run_onnx(exp, ref_fn):
    """Prefill + DECODE_STEPS greedy decode steps on ORT; returns (max abs diff, top-1 agreement, n).

    ``ref_fn(ids, mask) -> logits [batch, seq, vocab]`` for the whole sequence so far.
    """
    m = exp.manifest
    c = m.llama_config
    sess = exp.session()
    ids, mask = prompts(c.vocab_size)
    logits, presents = split_outputs(m, sess.run(None, build_feeds(m, ids, mask)))  # past = 0
    assert presents[0].shape == (2, c.num_kv_heads, 7, c.head_dim)
    assert logits.dtype == np.float32
    ref = ref_fn(ids, mask)
    real = mask.astype(bool)
    diffs = [np.abs(logits[real] - ref[real]).max()]
    agree = [(logits[real].argmax(-1) == ref[real].argmax(-1))]
    for step in range(DECODE_STEPS):
        nxt = logits[:, -1:].argmax(-1).astype(np.int64)
        ids = np.concatenate([ids, nxt], axis=1)
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        logits, presents = split_outputs(m, sess.run(None, build_feeds(m, nxt, mask, past=presents)))
        assert logits.shape == (2, 1, c.vocab_size)
        assert presents[0].shape == (2, c.num_kv_heads, 8 + step, c.head_dim)
        ref_last = ref_fn(ids, mask)[:, -1:]
        diffs.append(np.abs(logits - ref_last).max())
        agree.append((logits.argmax(-1) == ref_last.argmax(-1)).ravel())
    agree = np.concatenate(agree)
    return float(max(diffs)), float(agree.mean()), agree.size


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_fp32_matches_transformers(exported, name):
    exp = exported(name, "fp32")
    ref = hf_model(exp.checkpoint)
    diff, agree, _ = run_onnx(exp, lambda i, m: reference_logits(ref, i, m))
    assert diff <= 1e-4, f"{name}: max abs diff {diff:.3e}"
    assert agree == 1.0


def test_fp32_partial_rotary_matches_torch_model(exported):
    """rotary_dim 8 < head_dim 16; transformers' Llama cannot do this, our torch model can."""
    from llama_trt.checkpoint import load_model

    exp = exported("partial_rotary", "fp32")
    model, ckpt = load_model(exp.checkpoint)
    assert ckpt.config.rotary_dim == 8 and ckpt.config.head_dim == 16
    rope_attrs = [p for p in exp.manifest.plugin_ops if p.op_type == "RotaryEmbedding"]
    assert rope_attrs and rope_attrs[0].count == 4

    def ref_fn(ids, mask):
        pos = positions_from_mask(mask, ids.shape[1])
        with torch.no_grad():
            return model(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(pos))[0].numpy()

    diff, agree, _ = run_onnx(exp, ref_fn)
    assert diff <= 1e-4
    assert agree == 1.0


@pytest.mark.parametrize("name", ["gqa", "mqa_llama3_tied"])
def test_fp16_top1_agrees_with_transformers_fp32(exported, name):
    exp = exported(name, "fp16")
    assert exp.manifest.dtype == "fp16"
    ref = hf_model(exp.checkpoint)
    diff, agree, n = run_onnx(exp, lambda i, m: reference_logits(ref, i, m))
    FP16_REPORT[name] = diff
    assert agree == 1.0, f"{name}: fp16 top-1 agreement {agree:.3f} over {n} positions"
    assert diff <= 5e-2, f"{name}: fp16 max abs diff {diff:.3e}"


def test_left_padding_gives_unpadded_logits(exported):
    exp = exported("gqa", "fp32")
    m = exp.manifest
    sess = exp.session()
    ids, mask = prompts(m.llama_config.vocab_size)
    padded, _ = split_outputs(m, sess.run(None, build_feeds(m, ids, mask)))
    alone, _ = split_outputs(m, sess.run(None, build_feeds(m, ids[1:, 3:])))
    assert np.abs(padded[1, 3:] - alone[0]).max() <= 1e-5
    # and padding is not a no-op: without the mask the real tokens see the pads
    unmasked, _ = split_outputs(m, sess.run(None, build_feeds(m, ids, np.ones_like(mask),
                                                              position_ids=positions_from_mask(mask, 7))))
    assert np.abs(unmasked[1, 3:] - alone[0]).max() > 1e-3


def test_prefill_with_empty_past_then_decode_any_batch(exported):
    """past = 0 at run time (traced with past 4), seq 1 prefill, batch 3, then decode."""
    from llama_trt.checkpoint import load_model

    exp = exported("gqa", "fp32")
    m = exp.manifest
    c = m.llama_config
    model, _ = load_model(exp.checkpoint)
    sess = exp.session()
    ids = np.array([[1], [5], [9]], np.int64)
    logits, presents = split_outputs(m, sess.run(None, build_feeds(m, ids)))
    assert len(presents) == 2 * c.num_layers
    for p in presents:
        assert p.shape == (3, c.num_kv_heads, 1, c.head_dim)  # n_kv_heads, not n_heads
    with torch.no_grad():
        t_logits, t_cache = model(torch.from_numpy(ids))
    assert np.abs(logits - t_logits.numpy()).max() <= 1e-4
    for step in range(3):
        nxt = logits[:, -1:].argmax(-1).astype(np.int64)
        logits, presents = split_outputs(m, sess.run(None, build_feeds(m, nxt, past=presents)))
        with torch.no_grad():
            t_logits, t_cache = model(torch.from_numpy(nxt), past_key_values=t_cache)
        assert presents[0].shape == (3, c.num_kv_heads, 2 + step, c.head_dim)
        assert np.abs(logits - t_logits.numpy()).max() <= 1e-4
        assert np.abs(presents[-1] - t_cache[-1][1].numpy()).max() <= 1e-4


def test_stories260k_interleaved_greedy_matches_torch(exported, stories260k):
    """llama2.c model (interleaved RoPE, GQA 8/4, tied): 40 greedy tokens from BOS with the KV cache."""
    from llama_trt.checkpoint import load_model

    exp = exported("stories260k", "fp32")
    m = exp.manifest
    assert m.llama_config.rope_interleaved and m.source_format == "llama2c"
    model, _ = load_model(stories260k)
    steps = 40
    # torch: greedy with full recompute (no cache), independent of the ONNX cache path
    ids = torch.tensor([[1]])
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(ids)[0][:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    torch_ids = ids[0, 1:].tolist()
    # ONNX Runtime with the KV cache
    sess = exp.session()
    tok = np.array([[1]], np.int64)
    past, onnx_ids = None, []
    for _ in range(steps):
        n_past = 0 if past is None else past[0].shape[2]
        logits, past = split_outputs(m, sess.run(None, build_feeds(m, tok, np.ones((1, n_past + 1), np.int64), past=past)))
        tok = logits[:, -1:].argmax(-1).astype(np.int64)
        onnx_ids.append(int(tok[0, 0]))
    assert onnx_ids == torch_ids
    assert len(set(onnx_ids)) > 5  # a real continuation, not one repeated token
