"""llama-trt: LLaMA checkpoint -> ONNX (fused RoPE/RMSNorm plugin nodes) -> TensorRT -> tokens.

Stages (subpackages, in data-flow order): checkpoint, model, plugins, exporter,
trt_engines, validate, runtime, serve. Heavy optional modules are imported lazily.
"""

from .config import LlamaConfig, Precision, RopeScaling
from .errors import LlamaTrtError

__version__ = "0.1.0"

__all__ = ["LlamaConfig", "Precision", "RopeScaling", "LlamaTrtError", "__version__"]
