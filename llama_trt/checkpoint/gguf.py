"""GGUF files (llama.cpp's format): metadata -> LlamaConfig, tensors dequantized to fp32.

Read with the ``gguf`` package (``GGUFReader`` + ``gguf.quants.dequantize``). The result equals
what ``transformers`` makes of the same file (``from_pretrained(dir, gguf_file=...)``): llama.cpp's
converter permutes the rows of Q and K from Hugging Face's "rotate_half" RoPE pairing to the
interleaved one, and we undo that permutation exactly as transformers'
``modeling_gguf_pytorch_utils.LlamaConverter`` does, so the weights load in HF naming and layout.

The tokenizer and chat template live in the file's metadata. We materialize them as HF-style files
(tokenizer.json, tokenizer_config.json, chat_template.jinja, generation_config.json) with
transformers' own GGUF tokenizer converter: it is the reference the parity tests compare with,
and it knows both llama.cpp tokenizer families (SentencePiece "llama" and BPE "gpt2"). The files
are cached per GGUF content under ``<cache>/gguf-tokenizers/`` and the Checkpoint points at them.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..config import LlamaConfig, RopeScaling
from ..errors import CheckpointError, ConfigError
from .common import Checkpoint, check_state_dict, fingerprint_files

SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
# Tensors the model recomputes: llama.cpp's precomputed rope frequency factors.
_IGNORED = ("rope_freqs.weight",)


def _open(path: Path):
    try:
        import gguf
    except ImportError:
        raise CheckpointError(f"{path}: reading GGUF needs the gguf package; "
                              'install the extra: pip install -e ".[real]"') from None
    try:
        return gguf.GGUFReader(path)
    except Exception as exc:  # noqa: BLE001 - gguf raises ValueError/struct errors on bad files
        raise CheckpointError(f"{path}: not a readable GGUF file ({exc})") from None


def _fields(reader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items()
            if not name.startswith("tokenizer.ggml.")  # token lists are large; read on demand
            or name.endswith(("_token_id", "add_bos_token", "add_eos_token", ".model"))}


def config_from_gguf(meta: dict, source: Path, vocab_rows: int, has_output: bool) -> LlamaConfig:
    """Map ``llama.*`` metadata to our config (the keys transformers' ggml.py maps)."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{source}: GGUF architecture {arch!r} is not supported; "
                              "llama-trt reads llama-architecture GGUF files only")

    def key(name, default=None):
        value = meta.get(f"llama.{name}", default)
        if value is None:
            raise CheckpointError(f"{source}: GGUF metadata lacks llama.{name}")
        return value

    heads = int(key("attention.head_count"))
    head_dim = int(key("attention.key_length", int(key("embedding_length")) // heads))
    scaling = None
    rope_type = meta.get("llama.rope.scaling.type", "none")
    if rope_type == "linear":
        scaling = RopeScaling(rope_type="linear", factor=float(key("rope.scaling.factor")))
    elif rope_type not in ("none", None):
        raise CheckpointError(f"{source}: GGUF rope scaling {rope_type!r} is not supported "
                              "(supported: none, linear)")
    try:
        return LlamaConfig(
            vocab_size=int(meta.get("llama.vocab_size", vocab_rows)),
            hidden_size=int(key("embedding_length")),
            intermediate_size=int(key("feed_forward_length")),
            num_layers=int(key("block_count")),
            num_heads=heads,
            num_kv_heads=int(key("attention.head_count_kv", heads)),
            head_dim=head_dim,
            rotary_dim=int(key("rope.dimension_count", head_dim)),
            rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(key("rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            max_position_embeddings=int(key("context_length", 2048)),
            tie_word_embeddings=not has_output,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        )
    except ConfigError as exc:
        raise CheckpointError(f"{source}: {exc}") from None


def hf_name(gguf_name: str) -> str | None:
    """llama.cpp tensor name -> Hugging Face name (None for names we do not know)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.weight"
    return None


def unpermute_qk(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's ``permute`` of Q/K rows (interleaved pairs -> HF rotate_half halves)."""
    half = weight.shape[0] // n_heads // 2
    return weight.reshape(n_heads, half, 2, *weight.shape[1:]).swapaxes(2, 1).reshape(weight.shape)


def dequantize_tensor(tensor, source: Path) -> np.ndarray:
    """One GGUF tensor as float32 in numpy (row-major, HF) shape."""
    from gguf.quants import dequantize

    kind = tensor.tensor_type.name
    if kind not in SUPPORTED_TYPES:
        raise CheckpointError(f"{source}: tensor {tensor.name} has type {kind}, which llama-trt does not "
                              f"dequantize (supported: {', '.join(SUPPORTED_TYPES)}); re-quantize the "
                              "model with one of those types")
    values = dequantize(tensor.data, tensor.tensor_type)
    return np.ascontiguousarray(values, dtype=np.float32).reshape(tuple(int(n) for n in reversed(tensor.shape)))


def load_gguf(path: Path, *, tokenizer: bool = True) -> Checkpoint:
    """A llama-architecture GGUF file -> Checkpoint (weights fp32, HF naming and layout)."""
    path = Path(path)
    reader = _open(path)
    meta = _fields(reader)
    tensors = {t.name: t for t in reader.tensors}
    embd = tensors.get("token_embd.weight")
    if meta.get("general.architecture") == "llama" and embd is None:
        raise CheckpointError(f"{path}: GGUF file has no token_embd.weight tensor")
    config = config_from_gguf(meta, path, int(embd.shape[-1]) if embd is not None else 0,
                              has_output="output.weight" in tensors)
    state: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if name in _IGNORED:
            continue
        target = hf_name(name)
        if target is None:
            raise CheckpointError(f"{path}: unexpected GGUF tensor {name} (not a llama layout?)")
        values = dequantize_tensor(tensor, path)
        if target.endswith("q_proj.weight"):
            values = unpermute_qk(values, config.num_heads)
        elif target.endswith("k_proj.weight"):
            values = unpermute_qk(values, config.num_kv_heads)
        state[target] = torch.from_numpy(values if values.flags.writeable else values.copy())
    state = check_state_dict(state, config, path)
    has_tokenizer = "tokenizer.ggml.model" in meta
    tokenizer_dir = materialize_tokenizer(path, meta) if tokenizer and has_tokenizer else None
    files = tuple(sorted(tokenizer_dir.iterdir())) if tokenizer_dir else ()
    return Checkpoint(config=config, state_dict=state, format="gguf", path=path, files=(path,),
                      tokenizer_files=files, tokenizer_dir=tokenizer_dir)


def _tokenizer_cache(path: Path) -> Path:
    from .zoo import cache_dir

    return cache_dir() / "gguf-tokenizers" / fingerprint_files([path])[:16]


def materialize_tokenizer(path: Path, meta: dict) -> Path:
    """HF-style tokenizer files for ``path`` (cached): transformers' GGUF converter + metadata."""
    folder = _tokenizer_cache(path)
    if (folder / "tokenizer_config.json").is_file():
        return folder
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise CheckpointError(f"{path}: turning the GGUF tokenizer into tokenizer.json needs transformers; "
                              'install the extra: pip install -e ".[real]"') from None
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".tok-") as tmp:
        try:
            AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(tmp)
        except Exception as exc:  # noqa: BLE001 - converter errors name the tokenizer model
            raise CheckpointError(f"{path}: transformers could not convert the GGUF tokenizer ({exc})") from None
        _write_special_tokens(Path(tmp), meta)
        os.replace(tmp, folder)
        Path(tmp).mkdir()  # TemporaryDirectory expects something to remove
    return folder


def _write_special_tokens(folder: Path, meta: dict) -> None:
    """BOS/EOS policy from the metadata into tokenizer_config.json + generation_config.json."""
    config_path = folder / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text())
    for flag in ("add_bos_token", "add_eos_token"):
        if f"tokenizer.ggml.{flag}" in meta:
            tok_config[flag] = bool(meta[f"tokenizer.ggml.{flag}"])
    template = meta.get("tokenizer.chat_template")
    if template and not (folder / "chat_template.jinja").is_file() and "chat_template" not in tok_config:
        (folder / "chat_template.jinja").write_text(template)
    config_path.write_text(json.dumps(tok_config, indent=2))
    generation = {k: meta[f"tokenizer.ggml.{g}"] for k, g in (
        ("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"), ("pad_token_id", "padding_token_id"))
        if f"tokenizer.ggml.{g}" in meta}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))
