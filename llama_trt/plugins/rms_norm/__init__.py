"""Fused RMSNorm: torch custom op, ONNX node + function body, GPU kernel, TensorRT plugin."""

from .op import SPEC, rms_norm, rms_norm_reference

__all__ = ["SPEC", "rms_norm", "rms_norm_reference"]
