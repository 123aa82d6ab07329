"""``manifest.json`` of an export folder: what made ``model.onnx`` and its IO contract.

Light on purpose (json + dataclasses only): the runtime reads it without torch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..config import LlamaConfig
from ..errors import ConfigError, ExportError

MANIFEST_NAME = "manifest.json"
MODEL_NAME = "model.onnx"
EXTERNAL_DATA_NAME = "model.onnx.data"
KIND = "llama_trt.onnx_export"
FORMAT_VERSION = 1

_NUMPY_DTYPES = {"float32": "float32", "float16": "float16", "int64": "int64", "bfloat16": "bfloat16"}


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, element type and shape (str = named dynamic dim)."""

    name: str
    dtype: str                              # "float32" | "float16" | "int64"
    shape: tuple[int | str, ...]

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}

    @classmethod
    def from_dict(cls, d: dict) -> "TensorSpec":
        return cls(name=str(d["name"]), dtype=str(d["dtype"]), shape=tuple(d["shape"]))


@dataclass(frozen=True)
class PluginOpUse:
    """A fused op used by the graph: node identity, attribute types and node count."""

    domain: str
    op_type: str
    version: int
    attributes: dict[str, str]
    count: int

    @classmethod
    def from_dict(cls, d: dict) -> "PluginOpUse":
        return cls(domain=d["domain"], op_type=d["op_type"], version=int(d["version"]),
                   attributes=dict(d["attributes"]), count=int(d["count"]))


@dataclass(frozen=True)
class ExportManifest:
    source_checkpoint: str                  # path as given (resolved)
    source_format: str                      # "hf" | "meta" | "llama2c"
    source_sha256: str                      # fingerprint of the checkpoint files
    config: dict[str, Any]                  # LlamaConfig.to_dict()
    dtype: str                              # "fp32" | "fp16" | "int8" | "int4" (quantized: see quantization)
    opset: int
    plugin_ops: tuple[PluginOpUse, ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    tool_versions: dict[str, str]
    model_file: str = MODEL_NAME
    external_data: str | None = None        # file beside model_file, when weights > 2 GB
    tokenizer_files: tuple[str, ...] = ()
    model_bytes: int = 0                    # model.onnx (+ external data) size
    created: str = ""
    kind: str = KIND
    format_version: int = FORMAT_VERSION
    quantization: dict[str, Any] | None = None  # quantized exports (llama_trt/quantize): scheme, group, weight bytes, layers
    extra: dict[str, Any] = field(default_factory=dict)
    # written by `llama-trt validate` (validate/certificate.py: AccuracyCertificate.from_dict reads it)
    certificate: dict[str, Any] | None = None

    # ---- derived ------------------------------------------------------------
    @property
    def llama_config(self) -> LlamaConfig:
        return LlamaConfig.from_dict(self.config)

    @property
    def num_layers(self) -> int:
        return int(self.config["num_layers"])

    @property
    def kv_dtype(self) -> str:
        """numpy dtype name of the past/present tensors."""
        return "float16" if self.dtype == "fp16" else "float32"

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t.name: t.dynamic_axes for t in (*self.inputs, *self.outputs) if t.dynamic_axes}

    def model_path(self, folder) -> Path:
        return Path(folder) / self.model_file

    # ---- (de)serialisation --------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["plugin_ops"] = [asdict(p) for p in self.plugin_ops]
        d["inputs"] = [asdict(t) | {"shape": list(t.shape)} for t in self.inputs]
        d["outputs"] = [asdict(t) | {"shape": list(t.shape)} for t in self.outputs]
        d["tokenizer_files"] = list(self.tokenizer_files)
        d["dynamic_axes"] = {k: {str(a): n for a, n in v.items()} for k, v in self.dynamic_axes().items()}
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExportManifest":
        d = dict(d)
        d.pop("dynamic_axes", None)  # derived
        d["plugin_ops"] = tuple(PluginOpUse.from_dict(p) for p in d.get("plugin_ops", ()))
        d["inputs"] = tuple(TensorSpec.from_dict(t) for t in d["inputs"])
        d["outputs"] = tuple(TensorSpec.from_dict(t) for t in d["outputs"])
        d["tokenizer_files"] = tuple(d.get("tokenizer_files", ()))
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> "ExportManifest":
        return cls.from_dict(json.loads(text))


def load_manifest(folder) -> ExportManifest:
    """Read and check an export folder's manifest; :class:`ExportError` if it is not one."""
    folder = Path(folder)
    hint = "run `llama-trt export CHECKPOINT -o DIR` to create one"
    if not folder.exists():
        raise ExportError(f"export folder not found: {folder} ({hint})")
    if not folder.is_dir():
        raise ExportError(f"{folder} is a file, not an export folder ({hint})")
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise ExportError(f"{folder} is not an ONNX export: it has no {MANIFEST_NAME} ({hint})")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"{path}: unreadable manifest ({e}); re-export the model") from None
    if not isinstance(data, dict) or data.get("kind") != KIND:
        kind = data.get("kind") if isinstance(data, dict) else None
        raise ExportError(f"{path}: not an ONNX export manifest (kind {kind!r}, expected {KIND!r}); {hint}")
    if data.get("format_version") != FORMAT_VERSION:
        raise ExportError(
            f"{path}: manifest format version {data.get('format_version')!r} is not supported "
            f"(this llama-trt reads {FORMAT_VERSION}); re-export with this version"
        )
    try:
        manifest = ExportManifest.from_dict(data)
        manifest.llama_config  # validates the config
    except (KeyError, TypeError, ValueError, ConfigError) as e:
        raise ExportError(f"{path}: malformed manifest ({type(e).__name__}: {e}); re-export the model") from None
    from ..outputs import check_file_names

    for key in ("model_file", "external_data", "tokenizer_files"):
        if getattr(manifest, key):
            check_file_names(getattr(manifest, key), folder, key, ExportError)
    missing = [n for n in (manifest.model_file, manifest.external_data) if n and not (folder / n).is_file()]
    if missing:
        raise ExportError(f"{folder}: manifest lists {', '.join(missing)} but the file is missing; re-export the model")
    return manifest


__all__ = [
    "EXTERNAL_DATA_NAME", "ExportManifest", "MANIFEST_NAME", "MODEL_NAME", "PluginOpUse",
    "TensorSpec", "load_manifest",
]
