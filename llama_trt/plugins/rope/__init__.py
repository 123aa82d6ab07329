"""Fused RoPE: torch custom op, ONNX node + function body, GPU kernel, TensorRT plugin."""

from .op import SPEC, rope, rope_cos_sin, rope_reference

__all__ = ["SPEC", "rope", "rope_cos_sin", "rope_reference"]
