"""The validation report: frozen dataclasses that round-trip through JSON exactly.

``ValidationReport.from_json(report.to_json()) == report``: every field is rebuilt with
its declared type (tuples stay tuples, nested dataclasses are rebuilt), driven by the
type hints, so adding a field needs no extra (de)serialisation code.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class FeedInfo:
    name: str
    shapes: dict[str, tuple[int, ...]]
    input_ids: tuple[tuple[int, ...], ...]
    attention_mask: tuple[tuple[int, ...], ...]
    position_ids: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class OutputResult:
    """Polygraphy's elementwise comparison of one output for one feed."""

    feed: str
    output: str
    max_abs: float
    mean_abs: float
    max_rel: float
    atol: float
    rtol: float
    passed: bool


@dataclass(frozen=True)
class MetricResult:
    name: str
    value: float
    threshold: float | None
    op: str                     # ">=" | "<=" | "" (informational)
    passed: bool | None         # None: informational, not a gate
    description: str = ""


@dataclass(frozen=True)
class GreedyResult:
    prompt: tuple[int, ...]
    steps: int
    reference_tokens: tuple[int, ...]
    candidate_tokens: tuple[int, ...]
    agreement: float
    first_divergence: int | None
    kl_per_step: tuple[float, ...]          # up to and including the first divergence
    top1_margin_at_divergence: float | None  # reference logit gap between its top-2 there


@dataclass(frozen=True)
class PerplexityResult:
    tokens: int
    reference: float
    candidate: float
    relative_difference: float


@dataclass(frozen=True)
class LayerPoint:
    """One intermediate tensor compared layer by layer."""

    index: int
    layer: int                  # -1 = embedding, num_layers = final norm
    point: str                  # e.g. "layers.1.output"
    onnx_tensor: str
    max_abs: float
    mean_abs: float
    max_rel: float
    atol: float
    rtol: float
    passed: bool


@dataclass(frozen=True)
class LayerwiseResult:
    feed: str
    points: tuple[LayerPoint, ...]
    first_failing_layer: int | None
    first_failing_point: str | None


@dataclass(frozen=True)
class ValidationReport:
    artifact: str
    artifact_kind: str              # "onnx" | "engine"
    checkpoint: str
    backend: str                    # "onnxruntime" | "tensorrt"
    precision: str
    passed: bool
    failures: tuple[str, ...]
    feeds: tuple[FeedInfo, ...]
    heldout_tokens: tuple[int, ...]
    tolerances: dict[str, tuple[float, float]]   # output name or glob ("" default) -> (atol, rtol)
    metric_thresholds: dict[str, float]
    outputs: tuple[OutputResult, ...]
    metrics: tuple[MetricResult, ...]
    greedy: GreedyResult
    perplexity: PerplexityResult
    layerwise: LayerwiseResult | None
    versions: dict[str, str]
    manifest: dict[str, Any]
    notes: tuple[str, ...] = ()
    run_results: str | None = None      # Polygraphy RunResults saved beside the report
    seconds: float = 0.0
    certificate: "AccuracyCertificate | None" = None  # teacher-forced metrics over real text

    # ---- convenience --------------------------------------------------------
    def metric(self, name: str) -> MetricResult:
        for m in self.metrics:
            if m.name == name:
                return m
        raise KeyError(name)

    def worst_outputs(self) -> list[OutputResult]:
        """Per output name, the feed with the largest max abs error."""
        worst: dict[str, OutputResult] = {}
        for r in self.outputs:
            if r.output not in worst or (not r.passed, r.max_abs) > (not worst[r.output].passed, worst[r.output].max_abs):
                worst[r.output] = r
        return list(worst.values())

    # ---- JSON -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return _encode(self)

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ValidationReport":
        return _decode(cls, data)

    @classmethod
    def from_json(cls, text: str) -> "ValidationReport":
        return cls.from_dict(json.loads(text))

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json())
        return path

    @classmethod
    def load(cls, path) -> "ValidationReport":
        return cls.from_json(Path(path).read_text())


def load_report(path) -> ValidationReport:
    return ValidationReport.load(path)


def finite(x: float | None, cap: float = 1e300) -> float | None:
    """JSON has no NaN/inf: map NaN -> cap (a failure), +-inf -> +-cap."""
    if x is None:
        return None
    x = float(x)
    if math.isnan(x):
        return cap
    return max(-cap, min(cap, x))


def _encode(obj):
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _encode(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): _encode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_encode(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):  # numpy scalar
        return obj.item()
    return obj


def _decode(tp, value):
    if tp is Any or value is None and _allows_none(tp):
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        last = None
        for a in args:
            try:
                return _decode(a, value)
            except (TypeError, ValueError, KeyError) as e:
                last = e
        raise TypeError(f"cannot decode {value!r} as {tp}: {last}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise TypeError(f"{tp.__name__}: expected an object, got {type(value).__name__}")
        hints = typing.get_type_hints(tp)
        kwargs = {f.name: _decode(hints[f.name], value[f.name]) for f in dataclasses.fields(tp) if f.name in value}
        return tp(**kwargs)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"expected a list for {tp}, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_decode(args[0], v) for v in value)
        return tuple(_decode(a, v) for a, v in zip(args, value))
    if origin is dict:
        k_tp, v_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise TypeError(f"expected an object for {tp}")
        return {_decode(k_tp, k): _decode(v_tp, v) for k, v in value.items()}
    if origin is list:
        (a,) = typing.get_args(tp)
        return [_decode(a, v) for v in value]
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise TypeError(f"expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise TypeError(f"expected a string, got {value!r}")
        return value
    return value


def _allows_none(tp) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


# at the end: certificate.py reuses this module's codec, and the report's type hints name it
from .certificate import AccuracyCertificate  # noqa: E402
