"""The torch LLaMA reference model (stage 2 of the pipeline)."""

from .llama import KVCache, LlamaForCausalLM, attention_allowed, positions_from_mask

__all__ = ["KVCache", "LlamaForCausalLM", "attention_allowed", "positions_from_mask"]
