"""The one interface every backend session implements.

A session owns one model and its KV cache. Generation drives it with numpy only:

    session.reset(batch, capacity)          # optional: prefill resets too
    logits = session.prefill(ids, mask, pos)  # [batch, seq, vocab] float32, past = 0
    logits = session.step(ids, mask, pos)     # [batch, seq, vocab], past = tokens so far
    logits = session.step(ids, mask, pos, last_only=True)  # [batch, 1, vocab]: what generation needs

``attention_mask`` always covers past + new tokens (1 = attend, left padding = 0);
``position_ids`` are cumsum(mask) - 1 clamped at 0, as in the ONNX IO contract.
Adding a backend = one module with a :class:`Session` subclass registered in
``llama_trt.runtime.sessions.BACKENDS``.
"""

from __future__ import annotations

import abc
import os
from typing import Any

import numpy as np

from ...config import LlamaConfig
from ...errors import GenerationError


class Session(abc.ABC):
    """A loaded model plus its KV cache, driven with numpy int64 inputs."""

    #: backend name: "onnxruntime", "torch", "tensorrt"
    backend: str = ""

    def __init__(self, config: LlamaConfig, max_context: int) -> None:
        self.config = config
        self.max_context = int(max_context)
        self.batch = 0
        self.past_len = 0
        self.capacity = self.max_context

    # ---- cache state ---------------------------------------------------------
    def reset(self, batch: int, capacity: int | None = None) -> None:
        """Empty the KV cache for ``batch`` sequences of up to ``capacity`` tokens (default max_context)."""
        capacity = self.max_context if capacity is None else int(capacity)
        if batch <= 0:
            raise GenerationError(f"batch must be >= 1, got {batch}")
        if capacity > self.max_context:
            raise GenerationError(
                f"a KV cache of {capacity} tokens exceeds the context of {self.max_context}"
            )
        self.batch = int(batch)
        self.capacity = capacity
        self.past_len = 0
        self._reset(self.batch, capacity)

    @abc.abstractmethod
    def _reset(self, batch: int, capacity: int) -> None: ...

    # ---- forward ---------------------------------------------------------------
    def prefill(self, input_ids, attention_mask, position_ids, *, last_only: bool = False) -> np.ndarray:
        """Start new sequences (past = 0): resets the cache if it holds anything."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        b = input_ids.shape[0]
        if self.past_len or self.batch != b:
            self.reset(b, self.capacity if self.batch == b else None)
        return self.step(input_ids, attention_mask, position_ids, last_only=last_only)

    def step(self, input_ids, attention_mask, position_ids, *, last_only: bool = False) -> np.ndarray:
        """Run new tokens on top of the cache; returns float32 logits [batch, seq, vocab], or
        [batch, 1, vocab] for the last position only with ``last_only`` (all generation needs;
        a backend that can skips the lm head for the other positions)."""
        input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        attention_mask = np.ascontiguousarray(attention_mask, dtype=np.int64)
        position_ids = np.ascontiguousarray(position_ids, dtype=np.int64)
        if not self.batch:
            self.reset(input_ids.shape[0])
        b, seq = input_ids.shape
        if b != self.batch:
            raise GenerationError(f"batch {b} does not match the cache's batch {self.batch}; call reset()")
        total = self.past_len + seq
        if attention_mask.shape != (b, total) or position_ids.shape != (b, seq):
            raise GenerationError(
                f"attention_mask must be [batch, past+seq] = [{b}, {total}] and position_ids "
                f"[batch, seq] = [{b}, {seq}]; got {list(attention_mask.shape)} and {list(position_ids.shape)}"
            )
        if total > self.capacity:
            raise GenerationError(
                f"{total} tokens exceed the KV cache capacity of {self.capacity} (context {self.max_context})"
            )
        logits = self._forward(input_ids, attention_mask, position_ids, last_only=bool(last_only))
        self.past_len = total
        return logits

    @abc.abstractmethod
    def _forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, *,
                 last_only: bool = False) -> np.ndarray:
        """Run the model and advance the cache by seq tokens; float32 logits [batch, seq, vocab]
        ([batch, 1, vocab] with ``last_only``)."""

    # ---- reporting -------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """What this session runs on and what was tuned (threads, providers, optimisation...)."""
        return {"backend": self.backend, "max_context": self.max_context}

    def close(self) -> None:
        """Release the model; the session cannot be used afterwards."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def physical_cores() -> int:
    """Physical cores this process may run on (no psutil needed)."""
    try:
        allowed = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        allowed = os.cpu_count() or 1
    cores = set()
    try:
        phys = core = None
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("physical id"):
                    phys = line.split(":")[1].strip()
                elif line.startswith("core id"):
                    core = line.split(":")[1].strip()
                elif not line.strip() and core is not None:
                    cores.add((phys, core))
                    phys = core = None
        if core is not None:
            cores.add((phys, core))
    except OSError:
        pass
    n = len(cores) if cores else allowed
    return max(1, min(n, allowed))
