"""Backend sessions behind one interface, and the ``open_session`` factory.

Each backend is one module holding a :class:`Session` subclass with a
``from_artifact(artifact, **options)`` classmethod; it is imported only when used,
so running an ONNX file never imports torch or TensorRT.

Adding the TensorRT session = writing ``tensorrt_session.py`` with
``class TensorRTSession(Session)``; the factory already routes engine folders
(``manifest.json`` with ``"kind": "engine"`` + a ``*.plan`` file) to it.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

from ...errors import BackendUnavailableError, LlamaTrtError
from ..artifact import Artifact, resolve_artifact
from .base import Session, physical_cores

#: backend name -> (module, class)
BACKENDS: dict[str, tuple[str, str]] = {
    "tensorrt": (f"{__name__}.tensorrt_session", "TensorRTSession"),
    "onnxruntime": (f"{__name__}.ort_session", "OrtSession"),
    "torch": (f"{__name__}.torch_session", "TorchSession"),
}
BACKEND_CHOICES = ("auto", *BACKENDS)
_AUTO = {"engine": "tensorrt", "export": "onnxruntime", "checkpoint": "torch"}


class UnknownBackendError(LlamaTrtError):
    """The backend name is not one we know."""


def pick_backend(artifact: Artifact, backend: str = "auto") -> str:
    name = (backend or "auto").lower()
    if name not in BACKEND_CHOICES:
        raise UnknownBackendError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKEND_CHOICES)}")
    return _AUTO[artifact.kind] if name == "auto" else name


def _a(kind: str) -> str:
    return ("an " if kind[:1] in "aeiou" else "a ") + kind


def _check_compatible(artifact: Artifact, backend: str) -> None:
    p = artifact.path
    if backend == "tensorrt":
        if artifact.kind != "engine" or not artifact.engine_files:
            raise BackendUnavailableError(
                f"no TensorRT engine in {p} (expected an engine folder: *.plan + manifest.json with "
                f"\"kind\": \"engine\"); build one with `llama-trt build`, or pick --backend onnxruntime/torch"
            )
        from ...trt_engines.backend import detect_backend

        detect_backend()  # one adapter decides: full TensorRT or TensorRT-RTX; raises naming what to install
    elif backend == "onnxruntime":
        if artifact.kind != "export":
            hint = ("export it first with `llama-trt export CHECKPOINT OUT` or use --backend torch"
                    if artifact.kind == "checkpoint" else "pass the export folder the engine was built from")
            raise BackendUnavailableError(f"{p} is {_a(artifact.kind)}, not an ONNX export; {hint}")
        if importlib.util.find_spec("onnxruntime") is None:
            raise BackendUnavailableError("onnxruntime is not installed; pip install onnxruntime (or onnxruntime-gpu)")
    elif backend == "torch":
        if artifact.kind != "checkpoint" and artifact.source_checkpoint is None:
            raise BackendUnavailableError(
                f"the torch backend needs a checkpoint; {p} is {_a(artifact.kind)} whose source checkpoint "
                "is not recorded or no longer exists: pass the checkpoint path instead"
            )
        if importlib.util.find_spec("torch") is None:
            raise BackendUnavailableError("torch is not installed; the torch backend needs it (pip install torch)")


def open_session(artifact, backend: str = "auto", **options) -> Session:
    """Open ``artifact`` (a path or :class:`Artifact`) on ``backend``.

    backend: "auto" (engine -> tensorrt, export -> onnxruntime, checkpoint -> torch),
    "tensorrt", "onnxruntime" or "torch". ``options`` go to the session (e.g. ``threads``,
    ``providers`` for ONNX Runtime, ``dtype`` for torch). Raises a :class:`LlamaTrtError`
    with a one-line fix when the backend cannot run this artifact.
    """
    if not isinstance(artifact, Artifact):
        artifact = resolve_artifact(Path(artifact))
    name = pick_backend(artifact, backend)
    _check_compatible(artifact, name)
    module_name, cls_name = BACKENDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            raise BackendUnavailableError(
                f"the {name} session is not part of this llama-trt build yet; use --backend onnxruntime "
                "with the export folder"
            ) from None
        raise BackendUnavailableError(f"the {name} backend cannot load: missing module {e.name!r}") from None
    return getattr(module, cls_name).from_artifact(artifact, **options)


__all__ = ["BACKENDS", "BACKEND_CHOICES", "Session", "UnknownBackendError", "open_session", "physical_cores",
           "pick_backend"]
