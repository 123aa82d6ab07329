"""The fp32 torch reference of one checkpoint, shared by several validations.

Validating several artifacts of one checkpoint (the demo validates fp16 and int4-awq) used to
redo the reference's side each time: load the checkpoint, build the fp32 model, sample the
held-out ids, generate the greedy reference, and above all run the certificate text (2,765
SmolLM2 tokens) through the fp32 model, 15-20 s of the 35 s a validation took on 2 cores.
A :class:`TorchReference` does each of those once and hands back the very same arrays, so a
certificate made with it is identical to one made without it (tests/validate check).

What it keeps: the loaded :class:`~llama_trt.checkpoint.Checkpoint`, one fp32 model (its
weights are the checkpoint's tensors, not a copy), and the results keyed by their inputs
(the token ids of a batch, the sample's length and seed, the greedy prompt and steps). The
teacher-forced logits are the big part: tokens x vocab float32 (2,765 x 49,152 x 4 B = 0.54 GB
for SmolLM2); :meth:`TorchReference.release` drops them.

Only the reference lives here: nothing of an artifact, no backend. Must not import click.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import ValidationError

LogitsFn = Callable[[np.ndarray], np.ndarray]   # ids [batch, seq] int64 -> logits [batch, seq, vocab]


@contextlib.contextmanager
def torch_threads_for(config):
    """One intra-op thread for small models (restored afterwards).

    For models of a few million parameters every op is microseconds of work, and waking an
    OpenMP pool costs more: measured here on 2 busy cores, a 40-wide softmax took 16 ms with
    2 threads and 14 us with 1 (stories260K validation: 7.5 s -> 0.1 s to sample 64 tokens).
    """
    import torch

    before = torch.get_num_threads()
    small = config.num_parameters() < 50_000_000
    if small:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if small:
            torch.set_num_threads(before)


class TorchReference:
    """The fp32 torch model of ``checkpoint`` (a path or a loaded Checkpoint), computed once per input."""

    def __init__(self, checkpoint, *, keep_logits: bool = True) -> None:
        """``keep_logits=False``: compute the teacher-forced logits afresh on every call (a
        reference used for one certificate only need not hold 0.5 GB for nothing)."""
        from ..checkpoint import load_checkpoint

        self.checkpoint = checkpoint if hasattr(checkpoint, "state_dict") else load_checkpoint(checkpoint)
        self.keep_logits = keep_logits
        self._model = None
        self._fingerprint: str | None = None
        self._logits: dict[tuple, np.ndarray] = {}
        self._samples: dict[tuple, list[int]] = {}
        self._greedy: dict[tuple, tuple[list[int], list[np.ndarray]]] = {}

    @property
    def config(self):
        return self.checkpoint.config

    @property
    def path(self) -> Path:
        return Path(self.checkpoint.path)

    @property
    def model(self):
        """The fp32 :class:`LlamaForCausalLM` (built on first use; shares the checkpoint's tensors)."""
        if self._model is None:
            from ..checkpoint import build_model

            self._model = build_model(self.checkpoint, "fp32")
        return self._model

    def fingerprint(self) -> str:
        """sha256 of the checkpoint's files (hashed once: 0.5 GB for SmolLM2)."""
        if self._fingerprint is None:
            self._fingerprint = self.checkpoint.fingerprint()
        return self._fingerprint

    def check_same(self, checkpoint) -> None:
        """Refuse a ``checkpoint`` (path or Checkpoint) other than the one this reference holds."""
        from ..checkpoint.hub import resolve_checkpoint

        path = Path(checkpoint.path) if hasattr(checkpoint, "state_dict") else resolve_checkpoint(checkpoint)
        if Path(path).resolve() != self.path.resolve():
            raise ValidationError(f"the shared torch reference was built from {self.path}, not {path}; "
                                  "pass a reference of the checkpoint being validated")

    def logits_fn(self) -> LogitsFn:
        """The teacher-forced logits of a batch of ids; each distinct batch runs the model once."""
        from .teacher_forced import torch_logits_fn

        model_logits = torch_logits_fn(self.model)

        def run(ids: np.ndarray) -> np.ndarray:
            with torch_threads_for(self.config):
                return model_logits(ids)

        if not self.keep_logits:
            return run

        def cached(ids: np.ndarray) -> np.ndarray:
            ids = np.ascontiguousarray(ids, dtype=np.int64)
            key = (ids.shape, ids.tobytes())
            if key not in self._logits:
                self._logits[key] = run(ids)
            return self._logits[key]

        return cached

    def sample_tokens(self, length: int, seed: int, bos: int | None) -> list[int]:
        """:func:`.inputs.sample_tokens` from the fp32 model (the held-out ids), once per (length, seed, bos)."""
        from .inputs import sample_tokens

        key = (int(length), int(seed), bos)
        if key not in self._samples:
            with torch_threads_for(self.config):
                self._samples[key] = sample_tokens(self.model, length, seed=seed, bos=bos)
        return list(self._samples[key])

    def greedy(self, prompt: list[int], steps: int, generate) -> tuple[list[int], list[np.ndarray]]:
        """The reference's greedy tokens and per-step logits (fp32 KV cache), once per (prompt, steps).

        ``generate(runner, prompt, steps)`` runs the decoding loop on a Polygraphy runner (validate's
        :func:`~.greedy.greedy_generate`, which the candidate's decoding uses too)."""
        from .runners import TorchRunner

        key = (tuple(int(t) for t in prompt), int(steps))
        if key not in self._greedy:
            with torch_threads_for(self.config), \
                    TorchRunner(self.checkpoint, past_dtype=np.float32, name="torch-greedy") as runner:
                self._greedy[key] = generate(runner, list(prompt), steps)
        tokens, step_logits = self._greedy[key]
        return list(tokens), list(step_logits)

    def release(self) -> None:
        """Drop the kept results and the model (the checkpoint stays)."""
        self._logits.clear()
        self._samples.clear()
        self._greedy.clear()
        self._model = None


def reference_for(checkpoint, reference: "TorchReference | None") -> TorchReference:
    """``reference`` after checking it holds ``checkpoint``; when None, a fresh one for one use
    (its teacher-forced logits are not kept)."""
    if reference is None:
        return TorchReference(checkpoint, keep_logits=False)
    reference.check_same(checkpoint)
    return reference


__all__ = ["LogitsFn", "TorchReference", "reference_for"]
