"""Detect a checkpoint's format and load it; build the torch model from it."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CheckpointError
from .common import Checkpoint

FORMATS_HELP = (
    "a Hugging Face folder (config.json + *.safetensors), a Meta folder "
    "(params.json + consolidated.00.pth), a llama-architecture .gguf file, a llama2.c .bin file "
    "or a Hugging Face id (org/name) in the local Hugging Face cache"
)


def detect_format(path: Path) -> str:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path} (expected {FORMATS_HELP})")
    if path.is_file() and path.suffix.lower() == ".gguf":
        return "gguf"
    if path.is_dir():
        if (path / "config.json").is_file():
            return "hf"
        if (path / "params.json").is_file():
            return "meta"
        raise CheckpointError(f"{path}: folder has neither config.json nor params.json (expected {FORMATS_HELP})")
    if path.suffix == ".bin":
        if path.name.startswith("pytorch_model"):
            raise CheckpointError(f"{path}: pass the folder that holds pytorch_model.bin and config.json, not the file")
        return "llama2c"
    if path.suffix in (".safetensors", ".pth") or path.name in ("config.json", "params.json"):
        raise CheckpointError(f"{path}: pass the checkpoint folder ({path.parent}), not one of its files")
    raise CheckpointError(f"{path}: unrecognised checkpoint file (expected {FORMATS_HELP})")


def load_checkpoint(path) -> Checkpoint:
    """Load any supported checkpoint; raises :class:`CheckpointError` with a clear message."""
    from .hub import resolve_checkpoint

    path = resolve_checkpoint(path)
    fmt = detect_format(path)
    if fmt == "gguf":
        from .gguf import load_gguf

        return load_gguf(path)
    if fmt == "hf":
        from .hf import load_hf

        return load_hf(path)
    if fmt == "meta":
        from .meta import load_meta

        return load_meta(path)
    from .llama2c import load_llama2c

    return load_llama2c(path)


_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise CheckpointError(f"unknown dtype {name!r}; choose one of {', '.join(_DTYPES)}") from None


def build_model(ckpt: Checkpoint, dtype: str = "fp32"):
    """Instantiate :class:`LlamaForCausalLM` with the checkpoint's weights (eval mode)."""
    from ..model import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(ckpt.config)
    model = model.to_empty(device="cpu")
    state = {k: v.to(torch.float32) for k, v in ckpt.state_dict.items()}
    model.load_state_dict(state, strict=True, assign=True)
    if ckpt.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.to(torch_dtype(dtype)).eval()


def load_model(path, dtype: str = "fp32"):
    """Checkpoint path -> (model, checkpoint)."""
    ckpt = load_checkpoint(path)
    return build_model(ckpt, dtype), ckpt
