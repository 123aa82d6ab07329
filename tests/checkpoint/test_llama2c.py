"""stories260K.bin vs an independent numpy implementation of the llama2.c format and maths."""

from __future__ import annotations

import numpy as np
import torch

from llama_trt.checkpoint import load_model

STEPS = 64


def numpy_greedy(path, steps: int) -> list[int]:
    """Plain numpy LLaMA following llama2.c's run.c (interleaved RoPE, GQA, shared classifier)."""
    raw = open(path, "rb").read()
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = np.frombuffer(raw[:28], "<i4")
    shared = vocab > 0
    vocab = abs(vocab)
    hd = dim // n_heads
    f = np.frombuffer(raw[28:], "<f4")
    pos = 0

    def take(*shape):
        nonlocal pos
        n = int(np.prod(shape))
        out = f[pos:pos + n].reshape(shape).astype(np.float64)
        pos += n
        return out

    emb = take(vocab, dim)
    rms_att = take(n_layers, dim)
    wq = take(n_layers, n_heads * hd, dim)
    wk = take(n_layers, n_kv * hd, dim)
    wv = take(n_layers, n_kv * hd, dim)
    wo = take(n_layers, dim, n_heads * hd)
    rms_ffn = take(n_layers, dim)
    w1 = take(n_layers, hidden, dim)
    w2 = take(n_layers, dim, hidden)
    w3 = take(n_layers, hidden, dim)
    rms_final = take(dim)
    take(seq_len, hd // 2)
    take(seq_len, hd // 2)
    wcls = emb if shared else take(vocab, dim)

    def rmsnorm(x, w):
        return x / np.sqrt(np.mean(x * x) + 1e-5) * w

    def rope(v, p):  # v: [heads, hd], interleaved pairs
        out = v.copy()
        for i in range(0, hd, 2):
            freq = 1.0 / (10000.0 ** (i / hd))
            c, s = np.cos(p * freq), np.sin(p * freq)
            out[:, i] = v[:, i] * c - v[:, i + 1] * s
            out[:, i + 1] = v[:, i] * s + v[:, i + 1] * c
        return out

    kcache = np.zeros((n_layers, seq_len, n_kv, hd))
    vcache = np.zeros((n_layers, seq_len, n_kv, hd))
    token, out = 1, []
    for p in range(steps):
        x = emb[token].copy()
        for l in range(n_layers):
            xb = rmsnorm(x, rms_att[l])
            q = rope((wq[l] @ xb).reshape(n_heads, hd), p)
            kcache[l, p] = rope((wk[l] @ xb).reshape(n_kv, hd), p)
            vcache[l, p] = (wv[l] @ xb).reshape(n_kv, hd)
            att_out = np.zeros((n_heads, hd))
            for h in range(n_heads):
                kv = h // (n_heads // n_kv)
                scores = kcache[l, : p + 1, kv] @ q[h] / np.sqrt(hd)
                w = np.exp(scores - scores.max())
                w /= w.sum()
                att_out[h] = w @ vcache[l, : p + 1, kv]
            x = x + wo[l] @ att_out.reshape(-1)
            xb = rmsnorm(x, rms_ffn[l])
            g = w1[l] @ xb
            x = x + w2[l] @ ((g / (1 + np.exp(-g))) * (w3[l] @ xb))
        logits = wcls @ rmsnorm(x, rms_final)
        token = int(np.argmax(logits))
        out.append(token)
    return out


def test_stories260k_greedy_matches_numpy_reference(stories260k):
    expected = numpy_greedy(stories260k, STEPS)
    model, ckpt = load_model(stories260k)
    c = ckpt.config
    assert (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.vocab_size) == (64, 5, 8, 4, 512)
    assert c.tie_word_embeddings and c.rope_interleaved
    got, token, cache = [], torch.tensor([[1]]), None
    with torch.no_grad():
        for _ in range(STEPS):
            logits, cache = model(token, past_key_values=cache)
            token = logits[:, -1].argmax(-1, keepdim=True)
            got.append(int(token))
    assert got == expected
    assert len(set(expected)) > 10  # a real continuation, not a repeated token
