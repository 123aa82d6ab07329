"""Hugging Face folders: config.json + (sharded) safetensors or pytorch_model.bin."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import LlamaConfig, RopeScaling
from ..errors import CheckpointError, ConfigError
from .common import Checkpoint, check_state_dict, find_tokenizer_files

SUPPORTED_MODEL_TYPES = ("llama",)


def read_json(path: Path) -> dict:
    try:
        with open(path) as fh:
            data = json.load(fh)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def config_from_hf(cfg: dict, source: Path) -> LlamaConfig:
    """Map a transformers ``LlamaConfig`` JSON to ours (old and new rope keys)."""
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        archs = ", ".join(cfg.get("architectures") or []) or "unknown architecture"
        raise CheckpointError(
            f"{source}: model_type {model_type!r} ({archs}) is not a LLaMA checkpoint; "
            f"llama-trt supports model_type {', '.join(map(repr, SUPPORTED_MODEL_TYPES))}"
        )
    unsupported = []
    if cfg.get("attention_bias"):
        unsupported.append("attention_bias=true")
    if cfg.get("mlp_bias"):
        unsupported.append("mlp_bias=true")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        unsupported.append(f"hidden_act={act!r} (LLaMA uses silu)")
    if unsupported:
        raise CheckpointError(f"{source}: unsupported LLaMA variant: {', '.join(unsupported)}")

    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [k for k in required if k not in cfg]
    if missing:
        raise CheckpointError(f"{source}: missing config key(s): {', '.join(missing)}")

    # transformers >= 4.5x writes rope_parameters {rope_type, rope_theta, ...}; older
    # configs have rope_theta + rope_scaling {type|rope_type, factor, ...}.
    rope_params = cfg.get("rope_parameters") or {}
    rope_scaling_raw = cfg.get("rope_scaling") or {}
    if rope_params and not rope_scaling_raw:
        rope_scaling_raw = rope_params
    theta = rope_params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    scaling = None
    rtype = rope_scaling_raw.get("rope_type", rope_scaling_raw.get("type"))
    if rtype not in (None, "default"):
        known = {"rope_type", "type", "factor", "low_freq_factor", "high_freq_factor",
                 "original_max_position_embeddings", "rope_theta"}
        extra = sorted(set(rope_scaling_raw) - known)
        if rtype not in ("linear", "llama3"):
            raise CheckpointError(
                f"{source}: rope scaling type {rtype!r} is not supported (supported: default, linear, llama3)"
            )
        if extra:
            raise CheckpointError(f"{source}: unsupported rope scaling keys: {', '.join(extra)}")
        kw = {k: rope_scaling_raw[k] for k in ("low_freq_factor", "high_freq_factor",
                                               "original_max_position_embeddings") if k in rope_scaling_raw}
        scaling = RopeScaling(rope_type=rtype, factor=float(rope_scaling_raw.get("factor", 1.0)), **kw)
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    rotary_dim = int(head_dim * cfg.get("partial_rotary_factor", 1.0))
    try:
        return LlamaConfig(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=scaling,
            rope_interleaved=False,
            rotary_dim=rotary_dim,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
        )
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from None


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read safetensors file (truncated or corrupt?): {e}") from None


def _load_torch_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many kinds here (RuntimeError, UnpicklingError, EOFError)
        raise CheckpointError(f"{path}: cannot read PyTorch weights (truncated or corrupt?): {e}") from None
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: expected a state dict, got {type(sd).__name__}")
    return sd


def weight_files(folder: Path) -> list[Path]:
    """The weight files of an HF folder, preferring safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: has no weight_map")
        files = sorted({folder / f for f in weight_map.values()})
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(f"{index}: lists shard(s) that are missing: {', '.join(absent)}")
        return files
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    if shards:
        return shards
    bin_index = folder / "pytorch_model.bin.index.json"
    if bin_index.is_file():
        return sorted({folder / f for f in read_json(bin_index).get("weight_map", {}).values()})
    if (folder / "pytorch_model.bin").is_file():
        return [folder / "pytorch_model.bin"]
    raise CheckpointError(
        f"{folder}: no weights found (expected model.safetensors, sharded model-*-of-*.safetensors "
        "with model.safetensors.index.json, or pytorch_model.bin)"
    )


def load_hf(folder: Path) -> Checkpoint:
    config_path = folder / "config.json"
    config = config_from_hf(read_json(config_path), config_path)
    files = weight_files(folder)
    state: dict[str, torch.Tensor] = {}
    for f in files:
        part = _load_safetensors(f) if f.suffix == ".safetensors" else _load_torch_bin(f)
        state.update(part)
    state = check_state_dict(state, config, folder)
    return Checkpoint(
        config=config,
        state_dict=state,
        format="hf",
        path=folder,
        files=(config_path, *files),
        tokenizer_files=find_tokenizer_files(folder),
        tokenizer_dir=folder if find_tokenizer_files(folder) else None,
    )
