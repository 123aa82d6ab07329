"""Our torch model vs transformers LlamaForCausalLM on the same saved checkpoints."""

from __future__ import annotations

import pytest
import torch

from conftest import make_hf_checkpoint
from llama_trt.checkpoint import load_model

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32, "rope_theta": 500000.0}

CASES = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa": dict(num_attention_heads=8, num_key_value_heads=2),
    "mqa": dict(num_attention_heads=4, num_key_value_heads=1),
    "llama3_rope": dict(num_attention_heads=8, num_key_value_heads=2, rope_parameters=LLAMA3),
    "linear_rope": dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
    "tied": dict(tie_word_embeddings=True),
    "head_dim_override": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32),
}


def hf_model(path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("case", sorted(CASES))
def test_prefill_and_decode_match_transformers(tmp_path, case):
    path = make_hf_checkpoint(tmp_path / case, **CASES[case])
    ref = hf_model(path)
    ours, ckpt = load_model(path)
    assert ckpt.format == "hf"
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (3, 7), generator=g)  # batch > 1
    with torch.no_grad():
        r = ref(ids, use_cache=True)
        logits, cache = ours(ids)
        assert (logits - r.logits).abs().max().item() <= 1e-5
        past = r.past_key_values
        # decode three steps with the cache, feeding the same token to both
        for step in range(3):
            nxt = torch.randint(3, 128, (3, 1), generator=g)
            r = ref(nxt, past_key_values=past, use_cache=True)
            past = r.past_key_values
            logits, cache = ours(nxt, past_key_values=cache)
            assert cache[0][0].shape == (3, ckpt.config.num_kv_heads, 8 + step, ckpt.config.head_dim)
            assert (logits - r.logits).abs().max().item() <= 1e-5, f"decode step {step}"


def test_left_padding_matches_unpadded(tmp_path):
    from llama_trt.model import positions_from_mask

    path = make_hf_checkpoint(tmp_path / "m", num_attention_heads=8, num_key_value_heads=2)
    ours, _ = load_model(path)
    short = torch.tensor([[5, 6, 7]])
    padded = torch.tensor([[0, 0, 5, 6, 7], [9, 8, 7, 6, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        alone, _ = ours(short)
        batch, cache = ours(padded, attention_mask=mask, position_ids=positions_from_mask(mask, 5))
        assert (batch[0, 2:] - alone[0]).abs().max().item() <= 1e-5
        # decode one more token with the padded cache
        mask2 = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
        nxt = torch.tensor([[11], [11]])
        step, _ = ours(nxt, attention_mask=mask2, position_ids=positions_from_mask(mask2, 1), past_key_values=cache)
        alone2, _ = ours(torch.tensor([[5, 6, 7, 11]]))
        assert (step[0, 0] - alone2[0, -1]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("layout", ["sharded_safetensors", "pytorch_bin"])
def test_other_hf_weight_layouts(tmp_path, layout):
    path = make_hf_checkpoint(tmp_path / "base")
    ref = hf_model(path)
    out = tmp_path / layout
    if layout == "sharded_safetensors":
        ref.save_pretrained(out, max_shard_size="100KB")
        assert (out / "model.safetensors.index.json").is_file()
    else:
        out.mkdir()
        (out / "config.json").write_bytes((path / "config.json").read_bytes())
        torch.save(ref.state_dict(), out / "pytorch_model.bin")
    ours, ckpt = load_model(out)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert (ours(ids)[0] - ref(ids).logits).abs().max().item() <= 1e-5
    assert len(ckpt.files) >= 2


def test_legacy_rope_scaling_key(tmp_path):
    """Older configs carry rope_theta + rope_scaling{type: ...} instead of rope_parameters."""
    import json

    path = make_hf_checkpoint(tmp_path / "m", rope_parameters=LLAMA3)
    cfg = json.loads((path / "config.json").read_text())
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    params["type"] = params.pop("rope_type")
    cfg["rope_scaling"] = params
    (path / "config.json").write_text(json.dumps(cfg))
    from llama_trt.checkpoint import load_checkpoint

    c = load_checkpoint(path).config
    assert c.rope_scaling.rope_type == "llama3" and c.rope_theta == 500000.0
    assert c.rope_scaling.original_max_position_embeddings == 32
