"""Write checkpoints: Hugging Face folders (safetensors) and seeded tiny models.

Used by ``llama-trt create-tiny`` / the demo, and by tests that need a real
checkpoint on disk. Writes into a temporary folder and renames it into place,
so a failure leaves nothing half-written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..config import LlamaConfig
from ..errors import CheckpointError
from ..outputs import CHECKPOINT_KIND, MANIFEST, move_into_place, prepare_output


def hf_config_dict(config: LlamaConfig) -> dict:
    d = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": list(config.eos_token_id) if len(config.eos_token_id) != 1 else config.eos_token_id[0],
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    if config.rope_scaling is not None:
        s = config.rope_scaling
        d["rope_scaling"] = {
            "rope_type": s.rope_type, "factor": s.factor, "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings,
        }
        if s.rope_type == "linear":
            d["rope_scaling"] = {"rope_type": "linear", "factor": s.factor}
    return d


def save_hf_checkpoint(config: LlamaConfig, state_dict: dict, out_dir, *, overwrite: bool = False,
                       extra_files: dict[str, bytes] | None = None) -> Path:
    """Save ``state_dict`` (HF naming) + config.json as a Hugging Face folder.

    Only the HF "rotate_half" pairing can be written: a config with
    ``rope_interleaved=True`` would be misread by transformers.
    """
    from safetensors.torch import save_file

    if config.rope_interleaved:
        raise CheckpointError("cannot save an interleaved-RoPE model as a Hugging Face folder (permute wq/wk first)")
    out = Path(out_dir)
    tmp = prepare_output(out, force=overwrite, option="OUT_DIR", error=CheckpointError, tag="checkpoint")
    try:
        sd = {k: v.detach().contiguous().to(torch.float32) for k, v in state_dict.items()}
        if config.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config_dict(config), indent=2))
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        # marks the folder as ours, so a later --force may replace it (and nothing else)
        (tmp / MANIFEST).write_text(json.dumps({"kind": CHECKPOINT_KIND, "format": "hf"}, indent=2))
        move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def tiny_config(**overrides) -> LlamaConfig:
    """A small LLaMA with GQA (4 query heads / 2 KV heads), used by tests and the demo."""
    base = dict(
        vocab_size=256, hidden_size=64, intermediate_size=172, num_layers=2, num_heads=4,
        num_kv_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=256,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=(2,),
    )
    base.update(overrides)
    return LlamaConfig(**base)


def random_state_dict(config: LlamaConfig, seed: int = 0, std: float = 0.08) -> dict[str, torch.Tensor]:
    """Seeded random weights; norms around 1 so every path matters numerically."""
    from .common import expected_shapes

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in expected_shapes(config).items():
        if name.endswith("norm.weight"):
            sd[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            sd[name] = std * torch.randn(shape, generator=g)
    if config.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    return sd


def create_tiny_checkpoint(out_dir, *, seed: int = 0, overwrite: bool = False, **overrides) -> Path:
    config = tiny_config(**overrides)
    return save_hf_checkpoint(config, random_state_dict(config, seed), out_dir, overwrite=overwrite)
