"""Meta's params.json + consolidated.NN.pth loads to the same logits as the HF copy."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_hf_checkpoint
from llama_trt.checkpoint import load_model

N_HEADS, N_KV = 8, 2


def hf_to_meta(sd: dict, n_heads: int, n_kv: int) -> dict:
    """Undo the HF conversion permutation (half pairs -> interleaved pairs) and rename."""

    def unpermute(w, heads):
        out_dim, in_dim = w.shape
        return w.view(heads, 2, out_dim // heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)

    meta = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
            "output.weight": sd["lm_head.weight"], "rope.freqs": torch.zeros(4)}
    names = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
             "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
             "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
             "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
             "post_attention_layernorm": "ffn_norm"}
    for key, value in sd.items():
        if not key.startswith("model.layers."):
            continue
        _, _, idx, rest = key.split(".", 3)
        mod = rest.rsplit(".", 1)[0]
        if mod == "self_attn.q_proj":
            value = unpermute(value, n_heads)
        elif mod == "self_attn.k_proj":
            value = unpermute(value, n_kv)
        meta[f"layers.{idx}.{names[mod]}.weight"] = value
    return meta


def split_for_model_parallel(meta: dict, shards: int) -> list[dict]:
    """Split like Meta's model-parallel checkpoints (column / row / embedding-dim splits)."""
    col = ("wq", "wk", "wv", "w1", "w3", "output")
    row = ("wo", "w2")
    out = [dict() for _ in range(shards)]
    for k, v in meta.items():
        if any(f".{c}." in f".{k}" for c in col):
            parts = v.chunk(shards, 0)
        elif any(f".{r}." in k for r in row) or k.startswith("tok_embeddings"):
            parts = v.chunk(shards, 1)
        else:
            parts = [v] * shards
        for i, p in enumerate(parts):
            out[i][k] = p.clone()
    return out


@pytest.mark.parametrize("shards", [1, 2])
def test_meta_layout_matches_hf(tmp_path, shards):
    hf = make_hf_checkpoint(tmp_path / "hf", num_attention_heads=N_HEADS, num_key_value_heads=N_KV,
                            intermediate_size=128)
    meta_dir = tmp_path / "meta"
    meta_dir.mkdir()
    meta = hf_to_meta(load_file(hf / "model.safetensors"), N_HEADS, N_KV)
    for i, part in enumerate(split_for_model_parallel(meta, shards)):
        torch.save(part, meta_dir / f"consolidated.{i:02d}.pth")
    (meta_dir / "params.json").write_text(json.dumps(
        {"dim": 64, "n_layers": 2, "n_heads": N_HEADS, "n_kv_heads": N_KV, "vocab_size": 128,
         "multiple_of": 32, "norm_eps": 1e-5, "rope_theta": 10000.0, "max_seq_len": 256}))

    m_hf, _ = load_model(hf)
    m_meta, ckpt = load_model(meta_dir)
    assert ckpt.format == "meta" and ckpt.config.rope_interleaved
    assert not load_model(hf)[1].config.rope_interleaved
    ids = torch.tensor([[1, 17, 33, 5, 90, 4], [3, 3, 3, 3, 3, 3]])
    with torch.no_grad():
        a, ca = m_hf(ids)
        b, cb = m_meta(ids)
        assert (a - b).abs().max().item() <= 1e-5
        nxt = torch.tensor([[7], [8]])
        a2, _ = m_hf(nxt, past_key_values=ca)
        b2, _ = m_meta(nxt, past_key_values=cb)
        assert (a2 - b2).abs().max().item() <= 1e-5
