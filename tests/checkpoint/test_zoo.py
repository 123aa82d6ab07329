"""The real-model fixture: SmolLM2-135M-Instruct fetched from PyPI, converted once, and loaded by
our HF loader with the same logits as transformers' own GGUF loading of the file."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow


def test_gguf_file_is_a_gguf(smollm2_gguf):
    with open(smollm2_gguf, "rb") as f:
        assert f.read(4) == b"GGUF"


def test_reference_folder_matches_transformers_gguf_loading(smollm2_gguf, smollm2_hf):
    from transformers import LlamaForCausalLM

    from llama_trt.checkpoint import load_model

    reference = LlamaForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                 torch_dtype=torch.float32).eval()
    ours, ckpt = load_model(smollm2_hf)
    assert (ckpt.config.num_layers, ckpt.config.hidden_size) == (30, 576)
    assert (ckpt.config.num_heads, ckpt.config.num_kv_heads) == (9, 3)
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 2, 28, 5, 99, 12000, 49151]])
    with torch.no_grad():
        want = reference(ids).logits
        got = ours(ids)
    got = got[0] if isinstance(got, tuple) else got
    assert torch.allclose(got, want, atol=2e-4, rtol=0), (got - want).abs().max()
