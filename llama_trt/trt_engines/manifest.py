"""``manifest.json`` of an engine folder (``"kind": "engine"``). json + dataclasses only."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..config import LlamaConfig
from ..errors import BuildError
from .lowering import OpRoute
from .profiles import ProfileSpec, ShapeLimits

KIND = "engine"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
ENGINE_NAME = "model.plan"
LOG_NAME = "build.log"


@dataclass(frozen=True)
class EngineManifest:
    backend: str                          # "tensorrt" | "tensorrt_rtx"
    backend_version: str
    targets: tuple[str, ...]              # compute capabilities ("89", "120"); () = backend default
    precision: str                        # "fp32" | "fp16" | "int8" | "int4" (from the ONNX)
    limits: dict[str, int]                # max_batch, max_seq, max_context
    profiles: tuple[ProfileSpec, ...]
    op_routing: tuple[OpRoute, ...]
    config: dict[str, Any]                # LlamaConfig.to_dict()
    source: dict[str, Any]                # {"path": export dir, "manifest": the export manifest}
    io: dict[str, Any] = field(default_factory=dict)          # network inputs / outputs
    engine_file: str = ENGINE_NAME
    engine_bytes: int = 0
    weight_bytes: int | None = None       # weights stored in the plan (the builder's "Total Weights Memory")
    network_weight_bytes: dict[str, int] = field(default_factory=dict)  # parsed constants per type
    weight_path: dict[str, Any] | None = None  # the build-time fp16 weight pass (HalfWeights), if applied
    build_seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    timing_cache: dict[str, Any] = field(default_factory=dict)  # {"path", "used", "note"}
    header: dict[str, Any] | None = None  # decoded engine header (TensorRT-RTX), if decodable
    layer_counts: dict[str, int] = field(default_factory=dict)
    tokenizer_files: tuple[str, ...] = ()
    tool_versions: dict[str, str] = field(default_factory=dict)
    created: str = ""
    kind: str = KIND
    format_version: int = FORMAT_VERSION

    # ---- derived --------------------------------------------------------------
    @property
    def llama_config(self) -> LlamaConfig:
        return LlamaConfig.from_dict(self.config)

    @property
    def shape_limits(self) -> ShapeLimits:
        return ShapeLimits(int(self.limits["max_batch"]), int(self.limits["max_seq"]), int(self.limits["max_context"]))

    @property
    def max_context(self) -> int:
        return int(self.limits["max_context"])

    @property
    def kv_dtype(self) -> str:
        for t in self.io.get("inputs", ()):
            if t["name"].startswith("past_key_values."):
                return t["dtype"]
        return "float16" if self.source.get("manifest", {}).get("dtype") == "fp16" else "float32"

    def route_of(self, op_type: str) -> str | None:
        for r in self.op_routing:
            if r.op.split(".")[-1] == op_type:
                return r.route
        return None

    # ---- (de)serialisation ----------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["targets"] = list(self.targets)
        d["profiles"] = [p.to_dict() for p in self.profiles]
        d["op_routing"] = [r.to_dict() for r in self.op_routing]
        d["tokenizer_files"] = list(self.tokenizer_files)
        d["max_context"] = self.max_context  # read by llama_trt.runtime.artifact
        # key order: identity first
        first = ("kind", "format_version", "backend", "backend_version", "targets", "precision")
        return {k: d[k] for k in first} | {k: v for k, v in d.items() if k not in first}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EngineManifest":
        d = dict(d)
        d.pop("max_context", None)  # derived
        d["targets"] = tuple(str(t) for t in d.get("targets", ()))
        d["profiles"] = tuple(ProfileSpec.from_dict(p) for p in d["profiles"])
        d["op_routing"] = tuple(OpRoute.from_dict(r) for r in d.get("op_routing", ()))
        d["tokenizer_files"] = tuple(d.get("tokenizer_files", ()))
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> "EngineManifest":
        return cls.from_dict(json.loads(text))


def load_engine_manifest(folder) -> EngineManifest:
    """Read an engine folder's manifest; :class:`BuildError` saying how to fix it otherwise."""
    folder = Path(folder)
    hint = "build one with `llama-trt build EXPORT_DIR -o ENGINE_DIR`"
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise BuildError(f"{folder} is not an engine folder: no {MANIFEST_NAME} ({hint})")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BuildError(f"{path}: unreadable manifest ({e}); rebuild the engine") from None
    if not isinstance(data, dict) or data.get("kind") != KIND:
        kind = data.get("kind") if isinstance(data, dict) else None
        raise BuildError(f"{path}: kind {kind!r} is not an engine manifest; {hint}")
    if data.get("format_version") != FORMAT_VERSION:
        raise BuildError(f"{path}: engine manifest format {data.get('format_version')!r} is not supported "
                         f"(this llama-trt reads {FORMAT_VERSION}); rebuild the engine")
    try:
        manifest = EngineManifest.from_dict(data)
    except (KeyError, TypeError, ValueError) as e:
        raise BuildError(f"{path}: malformed engine manifest ({type(e).__name__}: {e}); rebuild the engine") from None
    from ..outputs import check_file_names

    check_file_names(manifest.engine_file, folder, "engine_file", BuildError)
    check_file_names(manifest.tokenizer_files, folder, "tokenizer_files", BuildError)
    if not (folder / manifest.engine_file).is_file():
        raise BuildError(f"{folder}: {manifest.engine_file} is missing; rebuild the engine")
    return manifest


__all__ = ["ENGINE_NAME", "EngineManifest", "KIND", "LOG_NAME", "MANIFEST_NAME", "load_engine_manifest"]
