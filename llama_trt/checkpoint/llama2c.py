"""llama2.c "legacy" .bin files (Karpathy's format; see shared/models/README.md).

Header: 7 little-endian int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads,
vocab_size, seq_len); a negative vocab_size means an unshared classifier. Then
float32 arrays, weights (out, in). RoPE pairs are interleaved.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..config import LlamaConfig
from ..errors import CheckpointError, ConfigError
from .common import Checkpoint, check_state_dict

HEADER_BYTES = 7 * 4


def read_header(path: Path) -> tuple[int, ...]:
    with open(path, "rb") as fh:
        head = fh.read(HEADER_BYTES)
    if len(head) < HEADER_BYTES:
        raise CheckpointError(f"{path}: file too short for a llama2.c header ({len(head)} bytes)")
    if head[:4] == b"ak42":
        raise CheckpointError(
            f"{path}: llama2.c version-1/2 export (magic 'ak42') is not supported; "
            "export with llama2.c's legacy format (export.py --version 0)"
        )
    return tuple(int(v) for v in np.frombuffer(head, dtype="<i4"))


def layout(dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len, shared) -> list[tuple[str, tuple[int, ...]]]:
    hd = dim // n_heads
    out = [
        ("token_embedding", (vocab, dim)),
        ("rms_att", (n_layers, dim)),
        ("wq", (n_layers, n_heads * hd, dim)),
        ("wk", (n_layers, n_kv * hd, dim)),
        ("wv", (n_layers, n_kv * hd, dim)),
        ("wo", (n_layers, dim, n_heads * hd)),
        ("rms_ffn", (n_layers, dim)),
        ("w1", (n_layers, hidden, dim)),
        ("w2", (n_layers, dim, hidden)),
        ("w3", (n_layers, hidden, dim)),
        ("rms_final", (dim,)),
        ("freq_cis_real", (seq_len, hd // 2)),
        ("freq_cis_imag", (seq_len, hd // 2)),
    ]
    if not shared:
        out.append(("wcls", (vocab, dim)))
    return out


_PER_LAYER = {
    "rms_att": "input_layernorm.weight",
    "wq": "self_attn.q_proj.weight",
    "wk": "self_attn.k_proj.weight",
    "wv": "self_attn.v_proj.weight",
    "wo": "self_attn.o_proj.weight",
    "rms_ffn": "post_attention_layernorm.weight",
    "w1": "mlp.gate_proj.weight",
    "w2": "mlp.down_proj.weight",
    "w3": "mlp.up_proj.weight",
}


def load_llama2c(path: Path) -> Checkpoint:
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = read_header(path)
    shared = vocab > 0
    vocab = abs(vocab)
    if min(dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len) <= 0 or dim % max(n_heads, 1):
        raise CheckpointError(
            f"{path}: implausible llama2.c header (dim={dim}, hidden={hidden}, layers={n_layers}, "
            f"heads={n_heads}, kv_heads={n_kv}, vocab={vocab}, seq_len={seq_len}); not a llama2.c .bin?"
        )
    parts = layout(dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len, shared)
    n_floats = sum(int(np.prod(s)) for _, s in parts)
    expected = HEADER_BYTES + 4 * n_floats
    actual = path.stat().st_size
    if actual != expected:
        what = "truncated" if actual < expected else "has trailing bytes"
        raise CheckpointError(
            f"{path}: file {what}: {actual} bytes, the header implies {expected} "
            f"(dim={dim}, layers={n_layers}, vocab={vocab}, shared classifier={shared})"
        )
    try:
        config = LlamaConfig(
            vocab_size=vocab, hidden_size=dim, intermediate_size=hidden, num_layers=n_layers,
            num_heads=n_heads, num_kv_heads=n_kv, rms_norm_eps=1e-5, rope_theta=10000.0,
            rope_interleaved=True, max_position_embeddings=seq_len,
            tie_word_embeddings=shared, bos_token_id=1, eos_token_id=(2,),
        )
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    data = np.fromfile(path, dtype="<f4", offset=HEADER_BYTES)
    arrays, offset = {}, 0
    for name, shape in parts:
        n = int(np.prod(shape))
        arrays[name] = torch.from_numpy(data[offset:offset + n].reshape(shape).copy())
        offset += n
    state = {"model.embed_tokens.weight": arrays["token_embedding"], "model.norm.weight": arrays["rms_final"]}
    for name, new in _PER_LAYER.items():
        for i in range(n_layers):
            state[f"model.layers.{i}.{new}"] = arrays[name][i]
    if not shared:
        state["lm_head.weight"] = arrays["wcls"]
    state = check_state_dict(state, config, path)
    return Checkpoint(config=config, state_dict=state, format="llama2c", path=path, files=(path,))
