"""Meta's native layout: params.json + consolidated.NN.pth (interleaved RoPE pairs).

Model-parallel shards are merged along the axis each tensor was split on.
Weights are used as stored (no wq/wk permutation); the config records
``rope_interleaved=True`` instead.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..config import LlamaConfig, RopeScaling
from ..errors import CheckpointError, ConfigError
from .common import Checkpoint, check_state_dict, find_tokenizer_files
from .hf import read_json

_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_LAYER_MAP = {
    "attention.wq.weight": ("self_attn.q_proj.weight", 0),
    "attention.wk.weight": ("self_attn.k_proj.weight", 0),
    "attention.wv.weight": ("self_attn.v_proj.weight", 0),
    "attention.wo.weight": ("self_attn.o_proj.weight", 1),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", 1),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", 0),
    "attention_norm.weight": ("input_layernorm.weight", None),
    "ffn_norm.weight": ("post_attention_layernorm.weight", None),
}
_TOP_MAP = {
    "tok_embeddings.weight": ("model.embed_tokens.weight", 1),
    "norm.weight": ("model.norm.weight", None),
    "output.weight": ("lm_head.weight", 0),
}


def _rename(name: str, source: Path) -> tuple[str, int | None] | None:
    if name in _TOP_MAP:
        return _TOP_MAP[name]
    if name == "rope.freqs":
        return None
    m = _LAYER.match(name)
    if m and m.group(2) in _LAYER_MAP:
        new, axis = _LAYER_MAP[m.group(2)]
        return f"model.layers.{m.group(1)}.{new}", axis
    raise CheckpointError(f"{source}: unexpected tensor {name!r} (not a Meta LLaMA checkpoint?)")


def _load_shard(path: Path) -> dict[str, torch.Tensor]:
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated zip, pickle errors, ...
        raise CheckpointError(f"{path}: cannot read PyTorch weights (truncated or corrupt?): {e}") from None
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: expected a state dict, got {type(sd).__name__}")
    return sd


def merge_shards(shards: list[dict[str, torch.Tensor]], source: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name in shards[0]:
        mapped = _rename(name, source)
        if mapped is None:
            continue
        new, axis = mapped
        parts = [s[name] for s in shards]
        out[new] = parts[0] if (axis is None or len(parts) == 1) else torch.cat(parts, dim=axis)
    return out


def config_from_params(params: dict, state: dict[str, torch.Tensor], source: Path) -> LlamaConfig:
    missing = [k for k in ("dim", "n_layers", "n_heads") if k not in params]
    if missing:
        raise CheckpointError(f"{source}: missing key(s) {', '.join(missing)} (not a Meta LLaMA params.json?)")
    emb = state.get("model.embed_tokens.weight")
    gate = state.get("model.layers.0.mlp.gate_proj.weight")
    if emb is None or gate is None:
        raise CheckpointError(f"{source}: missing tensor tok_embeddings.weight or layers.0.feed_forward.w1.weight")
    vocab = params.get("vocab_size", -1)
    vocab = vocab if vocab and vocab > 0 else emb.shape[0]
    scaling = None
    if params.get("use_scaled_rope"):
        # Llama 3.1 values, as in Meta's reference implementation.
        scaling = RopeScaling("llama3", factor=params.get("rope_scaling_factor", 8.0),
                              low_freq_factor=1.0, high_freq_factor=4.0,
                              original_max_position_embeddings=8192)
    bos, eos = (128000, (128001, 128008, 128009)) if vocab >= 128000 else (1, (2,))
    try:
        return LlamaConfig(
            vocab_size=vocab,
            hidden_size=params["dim"],
            intermediate_size=gate.shape[0],
            num_layers=params["n_layers"],
            num_heads=params["n_heads"],
            num_kv_heads=params.get("n_kv_heads") or params["n_heads"],
            rms_norm_eps=float(params.get("norm_eps", 1e-5)),
            rope_theta=float(params.get("rope_theta", 10000.0)),
            rope_scaling=scaling,
            rope_interleaved=True,
            max_position_embeddings=params.get("max_seq_len", 4096 if vocab < 128000 else 131072),
            tie_word_embeddings=False,
            bos_token_id=bos,
            eos_token_id=eos,
        )
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from None


def load_meta(folder: Path) -> Checkpoint:
    params_path = folder / "params.json"
    params = read_json(params_path)
    files = sorted(folder.glob("consolidated.*.pth"))
    if not files:
        raise CheckpointError(f"{folder}: params.json found but no consolidated.*.pth weights")
    state = merge_shards([_load_shard(f) for f in files], folder)
    config = config_from_params(params, state, params_path)
    state = check_state_dict(state, config, folder)
    return Checkpoint(
        config=config, state_dict=state, format="meta", path=folder,
        files=(params_path, *files), tokenizer_files=find_tokenizer_files(folder),
    )
