"""Fused ops shared by the model (torch custom ops), the exporter (ONNX nodes with
reference function bodies) and the engine builder (TensorRT plugins or native layers).

One sub-folder per op; adding a fused op means adding one folder and listing it in
:func:`all_specs`.
"""

from __future__ import annotations

from .spec import DOMAIN, FusedOpSpec


def all_specs() -> list[FusedOpSpec]:
    from .rms_norm import SPEC as RMS
    from .rope import SPEC as ROPE

    return [RMS, ROPE]


def load(mode: str = "aot") -> list[str]:
    """Register every fused op's TensorRT plugin (full TensorRT only); idempotent.

    Used by the engine builder and by the runtime before deserializing an engine that
    contains our plugins. Returns the plugin ids (``llama_trt::RMSNorm`` ...). Raises
    :class:`llama_trt.errors.BackendUnavailableError` when ``tensorrt.plugin`` is missing.
    """
    import importlib

    ids = []
    for spec in all_specs():
        module = importlib.import_module(f"{__name__}.{spec.torch_name}.trt_plugin")
        ids.append(module.register_plugins(mode=mode))
    return ids


__all__ = ["DOMAIN", "FusedOpSpec", "all_specs", "load"]
