"""What a runtime ARTIFACT path is: an ONNX export, a TensorRT engine, or a checkpoint.

* export dir: ``manifest.json`` (kind "llama_trt.onnx_export") + ``model.onnx`` (``model_file``)
* engine dir: ``manifest.json`` with ``"kind": "engine"`` and/or a ``*.plan`` file
* checkpoint: a Hugging Face folder (or ``org/name`` in the local Hugging Face cache), a Meta
  folder or a llama2.c ``.bin`` (torch backend)

Reads manifests with ``json`` only (no torch, no exporter import), so edge boxes
without torch can run an export.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import LlamaConfig
from ..errors import LlamaTrtError
from ..outputs import CHECKPOINT_KIND

TOKENIZER_NAMES = ("tokenizer.json", "tokenizer.model")


class ArtifactError(LlamaTrtError):
    """The artifact path is missing or is not an export, engine or checkpoint."""


@dataclass(frozen=True)
class Artifact:
    path: Path
    kind: str                       # "export" | "engine" | "checkpoint"
    manifest: dict[str, Any] = field(default_factory=dict)
    config: LlamaConfig | None = None   # None for checkpoints until loaded

    @property
    def onnx_path(self) -> Path:
        name = self.manifest.get("model_file") or "model.onnx"
        p = self.path / str(name)
        if not p.is_file():
            found = sorted(self.path.glob("*.onnx"))
            if found:
                return found[0]
        return p

    @property
    def engine_files(self) -> list[Path]:
        return sorted(self.path.glob("*.plan")) if self.path.is_dir() else []

    @property
    def max_context(self) -> int | None:
        limits = self.manifest.get("limits") if isinstance(self.manifest.get("limits"), dict) else {}
        for key in ("max_context", "max_seq_len", "context_length"):
            v = self.manifest.get(key, limits.get(key))
            if isinstance(v, int) and v > 0:
                return v
        return self.config.max_position_embeddings if self.config else None

    @property
    def source_checkpoint(self) -> Path | None:
        """The checkpoint an export/engine was made from, if the manifest names it and it exists."""
        for key in ("source_checkpoint", "checkpoint", "source"):
            v = self.manifest.get(key)
            if isinstance(v, dict):
                v = v.get("path")
            if isinstance(v, str) and Path(v).exists():
                return Path(v)
        return None

    def tokenizer_path(self) -> Path | None:
        """tokenizer.json (preferred) or tokenizer.model next to the artifact, if any."""
        base = self.path if self.path.is_dir() else None
        if base is None:  # a llama2.c .bin: its tokenizer is never guessed
            return None
        for name in TOKENIZER_NAMES:
            if (base / name).is_file():
                return base / name
        return None


def _config_from_manifest(manifest: dict, path: Path) -> LlamaConfig:
    for key in ("config", "llama_config", "model_config"):
        data = manifest.get(key)
        if isinstance(data, dict):
            try:
                return LlamaConfig.from_dict(data)
            except LlamaTrtError as e:
                raise ArtifactError(f"{path}/manifest.json has an invalid model config: {e}") from None
    raise ArtifactError(f"{path}/manifest.json has no model config; re-export it with `llama-trt export`")


def read_manifest(path: Path) -> dict[str, Any]:
    f = Path(path) / "manifest.json"
    try:
        data = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"cannot read {f}: {e}; re-create the artifact") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{f} is not a JSON object; re-create the artifact")
    from ..outputs import check_file_names

    for key in ("model_file", "external_data", "engine_file", "tokenizer_files"):
        if data.get(key):
            check_file_names(data[key], Path(path), key, ArtifactError)
    return data


def _looks_like_repo_id(path: Path) -> bool:
    parts = path.parts
    return len(parts) == 2 and not path.is_absolute() and all(p not in (".", "..") for p in parts)


def resolve_artifact(path) -> Artifact:
    """Classify ``path``; raises :class:`ArtifactError` with what was expected."""
    path = Path(path)
    expected = ("an export folder (model.onnx + manifest.json), an engine folder (*.plan + manifest.json) "
                "or a checkpoint (Hugging Face folder or id in the local Hugging Face cache, Meta folder, "
                "llama2.c .bin)")
    if not path.exists() and _looks_like_repo_id(path):
        from ..checkpoint.hub import resolve_checkpoint  # the torch backend will need torch anyway

        path = resolve_checkpoint(path)
    if not path.exists():
        raise ArtifactError(f"artifact not found: {path} (expected {expected})")
    if path.is_dir() and (path / "manifest.json").is_file():
        manifest = read_manifest(path)
        kind = str(manifest.get("kind", "")).lower()
        if kind == CHECKPOINT_KIND:  # a checkpoint llama-trt wrote (create-tiny): manifest.json only marks it
            return Artifact(path, "checkpoint")
        if "engine" in kind or (not kind and any(path.glob("*.plan"))):
            return Artifact(path, "engine", manifest, _config_from_manifest(manifest, path))
        if not kind or "export" in kind or "onnx" in kind:
            art = Artifact(path, "export", manifest, _config_from_manifest(manifest, path))
            if not art.onnx_path.is_file():
                raise ArtifactError(f"{path}: manifest.json is there but {art.onnx_path.name} is missing; re-export")
            return art
        raise ArtifactError(f"{path}: manifest kind {kind!r} cannot be run (expected {expected})")
    if path.is_dir() and any(path.glob("*.plan")):
        raise ArtifactError(f"{path}: engine file without manifest.json; rebuild it with `llama-trt build`")
    if path.is_dir() and any(path.glob("*.onnx")) and not (path / "config.json").is_file():
        raise ArtifactError(f"{path}: ONNX file without manifest.json; re-export it with `llama-trt export`")
    is_ckpt = (path.is_dir() and ((path / "config.json").is_file() or (path / "params.json").is_file())) or (
        path.is_file() and path.suffix == ".bin")
    if is_ckpt:
        return Artifact(path, "checkpoint")
    raise ArtifactError(f"{path} is not a runnable artifact (expected {expected})")
