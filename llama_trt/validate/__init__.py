"""Pipeline stage: validate (Polygraphy: torch fp32 reference vs ONNX Runtime vs TensorRT).

``validate(artifact_dir, checkpoint, backend=..., steps=..., tolerances=..., layerwise=...)``
returns a :class:`ValidationReport` (frozen, JSON round-trip); ``llama-trt validate``
prints it and exits 0 only if it passed.
"""

from .report import (
    FeedInfo, GreedyResult, LayerPoint, LayerwiseResult, MetricResult, OutputResult, PerplexityResult,
    ValidationReport, load_report,
)
from .tolerances import Tolerances, default_tolerances, parse_tol, parse_tols


def validate(*args, **kwargs) -> ValidationReport:
    """See :func:`llama_trt.validate.core.validate` (imported lazily: it pulls in polygraphy)."""
    from .core import validate as _validate

    return _validate(*args, **kwargs)


__all__ = [
    "FeedInfo", "GreedyResult", "LayerPoint", "LayerwiseResult", "MetricResult", "OutputResult",
    "PerplexityResult", "Tolerances", "ValidationReport", "default_tolerances", "load_report", "parse_tol",
    "parse_tols", "validate",
]
