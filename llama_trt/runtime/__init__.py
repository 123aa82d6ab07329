"""Pipeline stage: runtime — sessions over TensorRT / ONNX Runtime / torch, KV cache, sampling,
generation, tokenizers, benchmarking.

Importing this package (and running an ONNX export) never imports torch: the torch
session module is loaded only for ``backend="torch"``.
"""

from .artifact import Artifact, ArtifactError, resolve_artifact
from .generate import GenerationConfig, GenerationResult, StreamChunk, generate, generate_batch, stream
from .sampling import apply_repetition_penalty, apply_top_k, apply_top_p, sample_next
from .sessions import BACKEND_CHOICES, Session, UnknownBackendError, open_session
from .tokenizer import StreamDecoder, Tokenizer, TokenizerError, load_tokenizer

__all__ = [
    "Artifact", "ArtifactError", "BACKEND_CHOICES", "GenerationConfig", "GenerationResult", "Session",
    "StreamChunk", "StreamDecoder", "Tokenizer", "TokenizerError", "UnknownBackendError",
    "apply_repetition_penalty", "apply_top_k", "apply_top_p", "generate", "generate_batch", "load_tokenizer",
    "open_session", "resolve_artifact", "sample_next", "stream",
]
