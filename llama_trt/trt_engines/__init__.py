"""Pipeline stage: trt_engines (ONNX export -> TensorRT / TensorRT-RTX engine folder).

``build_engine(export_dir, engine_dir, BuildOptions(...)) -> EngineManifest`` is the entry
point; :mod:`.backend` is the one adapter over ``tensorrt`` and ``tensorrt_rtx``;
:mod:`.lowering` routes the fused ops (plugin / native layer / function body);
:mod:`.profiles` holds the prefill/decode optimization profiles and
:func:`select_profile`; :mod:`.compat` checks an engine against this machine.
Importing this package does not import TensorRT, onnx or torch.
"""

from .manifest import EngineManifest, load_engine_manifest
from .profiles import ProfileSpec, ShapeLimits, make_profiles, select_profile


def build_engine(artifact_dir, engine_dir, options=None) -> EngineManifest:
    """Build an engine folder from an export folder (see :func:`.builder.build_engine`)."""
    from .builder import build_engine as _build

    return _build(artifact_dir, engine_dir, options)


def __getattr__(name):
    if name in ("BuildOptions", "inspect_network"):
        from . import builder

        return getattr(builder, name)
    raise AttributeError(name)


__all__ = ["BuildOptions", "EngineManifest", "ProfileSpec", "ShapeLimits", "build_engine", "inspect_network",
           "load_engine_manifest", "make_profiles", "select_profile"]
