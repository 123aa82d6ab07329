"""The torch LLaMA: embedding, N decoder layers, final RMSNorm, lm head, KV cache.

Module and parameter names follow Hugging Face ``LlamaForCausalLM`` so a state
dict in HF naming loads directly. RMSNorm and RoPE go through the ``llama_trt``
torch custom ops so the exporter can turn them into plugin nodes.

One forward serves prefill (empty past) and decode (seq = 1): it takes the past
keys/values of every layer ([batch, n_kv_heads, past, head_dim]) and returns the
present ones (past + seq long). GQA shares each KV head with a group of query
heads by expand + reshape (repeat_interleave order), never by copying weights.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import LlamaConfig
from ..plugins.rms_norm import rms_norm
from ..plugins.rope import rope

KVCache = list[tuple[torch.Tensor, torch.Tensor]]


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """Holds inv_freq in float32 whatever dtype the model is cast to."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self._inv_freq_values = config.inv_freq()
        self.register_buffer("inv_freq", self._make(None), persistent=False)
        self.interleaved = bool(config.rope_interleaved)
        self.rotary_dim = int(config.rotary_dim)

    def _make(self, device) -> torch.Tensor:
        return torch.tensor(self._inv_freq_values, dtype=torch.float64).to(torch.float32).to(device)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self.inv_freq = self._make(self.inv_freq.device)  # undo any dtype cast
        return out

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return rope(x, position_ids, self.inv_freq, self.interleaved, self.rotary_dim)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.scaling = config.head_dim ** -0.5
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=False)

    def forward(self, x, position_ids, allowed, rotary, past_k, past_v):
        bsz, seq, _ = x.shape
        q = self.q_proj(x).view(bsz, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(bsz, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(bsz, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = rotary(q, position_ids)
        k = rotary(k, position_ids)
        k = torch.cat((past_k, k), dim=2)
        v = torch.cat((past_v, v), dim=2)
        present = (k, v)
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:  # (h0, h0, h1, h1...) = repeat_interleave order
            total = k.shape[2]
            k = k[:, :, None].expand(bsz, self.num_kv_heads, groups, total, self.head_dim)
            k = k.reshape(bsz, self.num_heads, total, self.head_dim)
            v = v[:, :, None].expand(bsz, self.num_kv_heads, groups, total, self.head_dim)
            v = v.reshape(bsz, self.num_heads, total, self.head_dim)
        scores = torch.matmul(q, k.transpose(2, 3)) * self.scaling
        scores = scores.to(torch.float32)
        scores = torch.where(allowed, scores, torch.finfo(torch.float32).min)
        probs = torch.softmax(scores, dim=-1).to(v.dtype)  # softmax in fp32
        out = torch.matmul(probs, v).transpose(1, 2).reshape(bsz, seq, self.num_heads * self.head_dim)
        return self.o_proj(out), present


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, position_ids, allowed, rotary, past_k, past_v):
        attn, present = self.self_attn(self.input_layernorm(x), position_ids, allowed, rotary, past_k, past_v)
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, present


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


def attention_allowed(attention_mask: torch.Tensor, seq: int) -> torch.Tensor:
    """Bool [batch, 1, seq, past+seq]: causal AND the key is not padding."""
    total = attention_mask.shape[1]
    past = total - seq
    key_pos = torch.arange(total, device=attention_mask.device)
    query_pos = torch.arange(seq, device=attention_mask.device) + past
    causal = key_pos[None, :] <= query_pos[:, None]
    return causal[None, None] & (attention_mask[:, None, None, :] != 0)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def empty_cache(self, batch: int, device=None) -> KVCache:
        c = self.config
        shape = (batch, c.num_kv_heads, 0, c.head_dim)
        dev = device or self.lm_head.weight.device
        return [(torch.zeros(shape, dtype=self.dtype, device=dev),) * 2 for _ in range(c.num_layers)]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
    ) -> tuple[torch.Tensor, KVCache]:
        """Returns float32 logits [batch, seq, vocab] and the present KV cache."""
        bsz, seq = input_ids.shape
        if past_key_values is None:
            past_key_values = self.empty_cache(bsz, input_ids.device)
        past = past_key_values[0][0].shape[2]
        if attention_mask is None:
            attention_mask = torch.ones(bsz, past + seq, dtype=torch.int64, device=input_ids.device)
        if position_ids is None:
            position_ids = torch.arange(past, past + seq, device=input_ids.device)[None].expand(bsz, seq)
        allowed = attention_allowed(attention_mask, seq)
        x = self.model.embed_tokens(input_ids)
        presents: KVCache = []
        for layer, (pk, pv) in zip(self.model.layers, past_key_values):
            x, present = layer(x, position_ids, allowed, self.model.rotary_emb, pk, pv)
            presents.append(present)
        x = self.model.norm(x)
        return self.lm_head(x).to(torch.float32), presents


def positions_from_mask(attention_mask: torch.Tensor, seq: int) -> torch.Tensor:
    """position_ids for the last ``seq`` tokens of a left-padded batch: (cumsum(mask) - 1), pads at 0."""
    pos = attention_mask.long().cumsum(-1) - 1
    pos = pos.clamp(min=0)
    return pos[:, -seq:]
