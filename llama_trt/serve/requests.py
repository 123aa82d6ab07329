"""What the serving engine takes and gives: requests, the events they receive, the errors it raises.

A :class:`GenRequest` is created on the HTTP side (or Triton's), queued with
:meth:`~llama_trt.serve.engine.Engine.submit` and driven by the scheduler thread, which
emits :class:`TokenEvent` s and one :class:`FinishEvent` (or :class:`ErrorEvent`) into the
request's own queue. :class:`TextState` applies stop strings and streams text with the rules of
``runtime.generate.stream``.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import LlamaTrtError
from ..runtime.generate import GenerationConfig
from ..runtime.tokenizer import StreamDecoder, Tokenizer


class QueueFullError(LlamaTrtError):
    """The request queue is full: the server answers 503 with Retry-After."""


class InvalidRequestError(LlamaTrtError):
    """A request the server refuses with 400 (OpenAI ``invalid_request_error``)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


class EngineStoppedError(LlamaTrtError):
    """The engine is shut down (or was never started)."""


# ---------------------------------------------------------------------------------------
# requests and the events they receive
def request_config(max_tokens: int, **sampling) -> GenerationConfig:
    """The :class:`GenerationConfig` of one served request. The one place where the request
    field ``max_tokens`` (OpenAI, Triton) becomes ``max_new_tokens``; ``sampling``: the other
    :class:`GenerationConfig` fields, same names."""
    return GenerationConfig(max_new_tokens=max_tokens, **sampling)


@dataclass(frozen=True)
class TokenEvent:
    token_id: int
    text: str          # new visible text ("" while a character or a possible stop string is pending)
    t: float           # perf_counter when sampled


@dataclass(frozen=True)
class FinishEvent:
    finish_reason: str  # "stop" | "length" | "cancelled"
    text: str           # held-back tail not yet sent in a TokenEvent
    full_text: str      # the whole completion text (stop string cut off)
    token_ids: tuple[int, ...]
    prompt_tokens: int
    completion_tokens: int
    stop: Any
    t: float


@dataclass(frozen=True)
class ErrorEvent:
    """The request ended without a result. ``status`` / ``code``: what the HTTP side answers."""

    message: str
    status: int = 500
    code: str | None = None


_ids = itertools.count(1)


class GenRequest:
    """One sequence from admission to finish. Created on the event loop; driven by the scheduler thread."""

    def __init__(self, prompt_ids: list[int], params: GenerationConfig, loop: asyncio.AbstractEventLoop | None = None,
                 timeout_s: float | None = None):
        self.id = next(_ids)
        self.prompt_ids = [int(i) for i in prompt_ids]
        self.params = params
        self.loop = loop
        self.events: asyncio.Queue | queue.SimpleQueue = asyncio.Queue() if loop is not None else queue.SimpleQueue()
        self._cancel = threading.Event()
        self.arrival = time.perf_counter()
        # the scheduler ends the request with a 504 ErrorEvent once this passes (None: never)
        self.deadline = None if timeout_s is None else self.arrival + float(timeout_s)
        self.first_token_at: float | None = None
        self.done = False
        # scheduler-side state
        self.generated: list[int] = []
        self.rng: np.random.Generator | None = None
        self.seen: np.ndarray | None = None
        self.text: TextState | None = None
        self.stop_ids: set[int] = set()

    # ---- called from the HTTP side ---------------------------------------------------
    def cancel(self) -> None:
        """The client went away: the scheduler frees the slot at its next iteration."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    # ---- called from the scheduler thread -----------------------------------------------
    def emit(self, event) -> None:
        if isinstance(event, (FinishEvent, ErrorEvent)):
            self.done = True
        if self.loop is None:
            self.events.put(event)
            return
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody listens any more
            pass


class TextState:
    """Stop strings and streamed text, with the same rules as ``runtime.generate.stream``."""

    def __init__(self, tokenizer: Tokenizer | None, stop_strings: tuple[str, ...]):
        self.tok = tokenizer
        self.stops = stop_strings if tokenizer is not None else ()
        self.dec = StreamDecoder(tokenizer) if tokenizer is not None else None
        self.holdback = max((len(s) for s in self.stops), default=0)
        self.emitted = ""
        self.stopped_text: str | None = None

    def check_stop(self, generated: list[int]) -> str | None:
        """The stop string now present in the text (and cut the text there), if any."""
        if not self.stops:
            return None
        text = self.tok.decode(generated)
        hits = [(text.find(s), s) for s in self.stops if s in text]
        if not hits:
            return None
        pos, s = min(hits)
        self.stopped_text = text[:pos]
        return s

    def delta(self, token_id: int, finished: bool) -> str:
        if self.dec is None:
            return ""
        self.dec.push(token_id)
        visible = self.stopped_text if self.stopped_text is not None else self.dec.text
        if not finished and self.holdback:
            visible = visible[: max(len(self.emitted), len(visible) - self.holdback + 1)]
        d = visible[len(self.emitted):] if visible.startswith(self.emitted) else ""
        self.emitted += d
        return d

    def final(self, generated: list[int]) -> tuple[str, str]:
        """(tail not yet emitted, full text)."""
        if self.tok is None:
            return "", ""
        full = self.stopped_text if self.stopped_text is not None else self.tok.decode(generated)
        tail = full[len(self.emitted):] if full.startswith(self.emitted) else ""
        self.emitted += tail
        return tail, full
