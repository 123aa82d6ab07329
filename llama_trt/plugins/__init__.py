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


__all__ = ["DOMAIN", "FusedOpSpec", "all_specs"]
