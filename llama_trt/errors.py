"""One error family for the whole toolkit.

Every message says what is wrong and how to fix it. The CLI catches
:class:`LlamaTrtError` and prints it as one line (exit code 2 for usage/input
problems), so nothing below should leak a library traceback to a user.
"""

from __future__ import annotations


class LlamaTrtError(Exception):
    """Base class: a problem the user can act on."""

    exit_code = 2


class ConfigError(LlamaTrtError):
    """A model configuration is inconsistent or unsupported."""


class CheckpointError(LlamaTrtError):
    """A checkpoint is missing, not LLaMA, truncated, or has wrong tensors."""


class ExportError(LlamaTrtError):
    """Exporting to ONNX failed or the output folder cannot be used."""


class BuildError(LlamaTrtError):
    """Building a TensorRT engine failed."""


class BackendUnavailableError(LlamaTrtError):
    """An optional backend (TensorRT, onnxruntime, torch...) is not installed."""


class ValidationError(LlamaTrtError):
    """Validation could not run (bad inputs); a failed comparison is not this."""


class GenerationError(LlamaTrtError):
    """Generation request is invalid (empty prompt, longer than the context...)."""
