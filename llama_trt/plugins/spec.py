"""What a fused op is, independent of any backend.

One :class:`FusedOpSpec` per plugin folder names the op once: the torch custom op
(``llama_trt::<torch_name>``), the ONNX node (domain ``llama_trt``, ``op_type``) and
the TensorRT plugin (namespace = domain, name = op_type) all derive from it.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

DOMAIN = "llama_trt"


@dataclass(frozen=True)
class FusedOpSpec:
    torch_name: str          # torch.library name inside the llama_trt namespace
    op_type: str             # ONNX op type and TensorRT plugin name
    attributes: dict         # attribute name -> "int" | "float" (ONNX INT -> int32, FLOAT -> float32)
    domain: str = DOMAIN
    version: int = 1

    @property
    def torch_qualname(self) -> str:
        return f"{self.domain}::{self.torch_name}"

    @property
    def plugin_id(self) -> str:
        """``namespace::name`` as used by ``tensorrt.plugin.register``."""
        return f"{self.domain}::{self.op_type}"


@functools.lru_cache(maxsize=1)
def triton_usable() -> bool:
    """Whether the Triton kernels can run (triton is installed); checked once per process."""
    return importlib.util.find_spec("triton") is not None
