"""The serving engine: a bounded request queue and a continuous-batching scheduler thread.

Built only on the public :class:`~llama_trt.runtime.sessions.base.Session` interface
(``reset`` / ``step`` over numpy with an attention mask covering past + new tokens) and
the runtime's ``sample_next`` / tokenizer / ``StreamDecoder``; no backend internals.

How continuous batching works without touching a backend's KV cache
--------------------------------------------------------------------
The session holds one cache of ``W`` rows (``W <= max_batch`` slots) and one shared
``past`` length. The scheduler keeps the full attention mask ``[W, past]`` itself.
Every iteration runs **one** ``session.step`` for all rows:

* decode: every active row feeds its last sampled token (``seq = 1``).
* join: new requests take free rows *in the running cache*. The step's chunk is
  ``S = longest new prompt`` wide; a new row feeds its prompt left-padded in the chunk,
  and its whole old past (a finished request's keys) is masked out (mask 0). Running rows
  feed their one pending token at the chunk's last position, left-padded too, so they
  decode in the very same step. Padded cache entries stay masked forever.
* rebuild: when the cache must grow wider (more rows than ``W``), when ``past + S`` would
  pass the KV capacity (masked holes accumulate), or when most rows sit idle, the cache is
  reset and every active sequence is re-prefilled from its token history (prompt +
  generated), left-padded (recompute, as vLLM does for preemption). That step also
  yields every row's next token, so it doubles as a decode step.

Static fallback (``continuous=False``, the default for TensorRT sessions, whose engines
have a prefill profile (past = 0) and a decode profile (seq = 1) but no multi-token step
on a non-empty cache): a group of queued requests is admitted only when the batch has
drained, prefilled together left-padded, then decoded together.

Free rows inside the cache feed a dummy token (masked from everyone else; rows never see
each other). Each request samples with its own numpy ``Generator`` seeded like
``llama-trt run --seed``, so a request alone gets exactly the tokens ``generate`` gives.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import LlamaTrtError
from ..runtime.sampling import sample_next
from ..runtime.tokenizer import Tokenizer
from .requests import (  # noqa: F401  (re-exported: the engine's public request / event / error types)
    EngineStoppedError, ErrorEvent, FinishEvent, GenRequest, InvalidRequestError, QueueFullError, TextState,
    TokenEvent, request_config,
)

log = logging.getLogger("llama_trt.serve")


@dataclass
class EngineStats:
    steps: int = 0              # session.step calls
    rows_stepped: int = 0       # sum over steps of active rows in the step
    joins: int = 0              # steps that admitted requests into a running cache
    rebuilds: int = 0           # cache resets + re-prefill of every active sequence
    tokens: int = 0
    finished: int = 0
    cancelled: int = 0
    errors: int = 0
    max_active: int = 0
    last_error: str = ""
    batch_hist: dict[int, int] = field(default_factory=dict)  # active rows per step -> count


class Engine:
    """A :class:`Session` + tokenizer behind a bounded queue and a batching scheduler thread.

    ``max_batch``: decode slots (rows of the KV cache). ``max_queue``: requests waiting for a
    slot; one more is refused with :class:`QueueFullError`. ``shrink_ratio``: rebuild a
    narrower cache when active rows * ratio <= width (0 = never shrink).
    """

    def __init__(self, session, tokenizer: Tokenizer | None = None, *, model_name: str = "llama-trt",
                 max_batch: int = 8, max_queue: int = 64, shrink_ratio: int = 4, describe: dict | None = None,
                 continuous: bool | None = None):
        if max_batch < 1:
            raise LlamaTrtError(f"--max-batch must be >= 1, got {max_batch}")
        if max_queue < 1:
            raise LlamaTrtError(f"--max-queue must be >= 1, got {max_queue}")
        self.session = session
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_batch = int(max_batch)
        self.max_queue = int(max_queue)
        self.shrink_ratio = int(shrink_ratio)
        # Joining mid-batch runs a multi-token step on a non-empty cache. TensorRT engines are
        # built with a prefill profile (past = 0) and a decode profile (seq = 1) only, so there
        # the scheduler falls back to static batching: a group is admitted when the batch drains.
        if continuous is None:
            continuous = getattr(session, "backend", "") != "tensorrt"
        self.continuous = bool(continuous)
        self.config = session.config
        self.max_context = int(session.max_context)
        self.vocab_size = int(self.config.vocab_size)
        self.created = int(time.time())
        self.info = dict(describe or {})
        eos = set(self.config.eos_token_id)
        if tokenizer is not None:  # the eos token and generation_config.json's eos list
            eos.update(int(i) for i in tokenizer.eos_ids)
        self.eos_ids = eos
        self.stats = EngineStats()
        self._queue: queue.Queue[GenRequest] = queue.Queue(maxsize=self.max_queue)
        self._stop = threading.Event()
        self._draining = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        # cache state (scheduler thread only)
        self._rows: list[GenRequest | None] = []
        self._mask = np.zeros((0, 0), dtype=np.int64)
        self._npos: list[int] = []
        self._pending: list[GenRequest] = []  # admitted this iteration, not yet in a finished step
        self._dirty = False                    # a step failed: the cache must be rebuilt

    # ---- lifecycle -------------------------------------------------------------------
    def start(self) -> "Engine":
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._draining.clear()
                self._thread = threading.Thread(target=self._loop, name="llama-trt-scheduler", daemon=True)
                self._thread.start()
        return self

    def drain(self) -> None:
        """Stop admitting: ``submit`` raises :class:`EngineStoppedError` (503); running requests go on."""
        self._draining.set()

    @property
    def draining(self) -> bool:
        return self._draining.is_set()

    @property
    def idle(self) -> bool:
        """Nothing queued and nothing running (a drain is complete)."""
        return self.queue_depth == 0 and self.active_count == 0 and not self._pending

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        for r in list(self._rows) + list(self._pending):
            if r is not None and not r.done:
                r.emit(ErrorEvent("the server is shutting down", 503, "shutting_down"))
        self._rows, self._pending = [], []
        while True:
            try:
                self._queue.get_nowait().emit(ErrorEvent("the server is shutting down", 503, "shutting_down"))
            except queue.Empty:
                break

    def close(self) -> None:
        self.stop()
        self.session.close()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- observed by /metrics and tests ------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    @property
    def active_count(self) -> int:
        return sum(1 for r in list(self._rows) if r is not None)

    # ---- request side -------------------------------------------------------------------
    def check(self, prompt_ids: list[int], max_tokens: int | None, *, param: str = "prompt") -> int:
        """Validate a prompt; returns max_tokens (None = rest of the context). Raises InvalidRequestError."""
        n = len(prompt_ids)
        if n == 0:
            raise InvalidRequestError("the prompt is empty; give at least one token", param)
        bad = [i for i in prompt_ids if not 0 <= int(i) < self.vocab_size]
        if bad:
            raise InvalidRequestError(
                f"prompt token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})", param)
        c = self.max_context
        if n >= c:
            raise InvalidRequestError(
                f"this model's maximum context length is {c} tokens, but the prompt has {n} tokens "
                "(at least one token must be left to generate); shorten the prompt",
                param, "context_length_exceeded")
        if max_tokens is None:
            return c - n
        if n + max_tokens > c:
            raise InvalidRequestError(
                f"this model's maximum context length is {c} tokens; the prompt has {n} tokens and "
                f"max_tokens is {max_tokens} (at most {c - n} here); lower max_tokens or shorten the prompt",
                "max_tokens", "context_length_exceeded")
        return max_tokens

    def submit(self, request: GenRequest) -> GenRequest:
        if not self.running:
            raise EngineStoppedError("the engine is not running")
        if self._draining.is_set():
            raise EngineStoppedError("the server is shutting down and admits no new requests")
        try:
            self._queue.put_nowait(request)
        except queue.Full:
            raise QueueFullError(
                f"the server is busy: {self.max_queue} requests are already waiting; retry shortly") from None
        return request

    # ---- scheduler thread -----------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._iteration()
                self._pending = []
            except Exception as e:  # noqa: BLE001 - one bad step must not kill the server
                log.exception("scheduler step failed")
                self._recover(e)

    def _recover(self, error: Exception) -> None:
        """Answer a failed step to the requests that caused it, keep the others running.

        A step that admitted new requests blames them (the running rows were fine a step ago):
        they get the error; the running rows are re-prefilled from their history next iteration.
        A step with no newcomer blames every row in it.
        """
        self.stats.errors += 1
        self.stats.last_error = f"{type(error).__name__}: {error}"
        event = ErrorEvent(f"generation failed: {type(error).__name__}: {error}")
        culprits = set(map(id, self._pending)) or {id(r) for r in self._rows if r is not None}
        for r in self._pending:
            r.emit(event)
        survivors = []
        for r in self._rows:
            if r is None:
                continue
            if id(r) in culprits:
                r.emit(event)
            else:
                survivors.append(r)
        self._pending = []
        self._rows = survivors
        self._npos = [0] * len(survivors)
        self._mask = np.zeros((len(survivors), 0), dtype=np.int64)
        self._dirty = bool(survivors)

    def _admit(self, free: int, block: bool) -> list[GenRequest]:
        new: list[GenRequest] = []
        while len(new) < free:
            try:
                r = self._queue.get(timeout=0.05) if (block and not new) else self._queue.get_nowait()
            except queue.Empty:
                break
            if r.cancelled:
                self._finish(r, "cancelled")
                continue
            if r.expired(time.perf_counter()):
                self._expire(r)
                continue
            try:
                self._init_request(r)
            except Exception as e:  # noqa: BLE001 - answered to this request only
                log.warning("request %d refused by the scheduler: %s", r.id, e)
                r.emit(ErrorEvent(f"invalid request: {e}", 400, "invalid_request"))
                continue
            new.append(r)
            self._pending.append(r)
        return new

    def _expire(self, r: GenRequest) -> None:
        self.stats.cancelled += 1
        r.emit(ErrorEvent("the request ran past its deadline (--request-timeout); retry with a lower "
                          "max_tokens or when the server is less busy", 504, "timeout"))

    def _init_request(self, r: GenRequest) -> None:
        p = r.params
        r.rng = np.random.default_rng(p.seed)
        if p.repetition_penalty != 1.0:
            r.seen = np.zeros(self.vocab_size, dtype=bool)
            r.seen[r.prompt_ids] = True
        eos = self.eos_ids if p.eos_token_ids is None else p.eos_token_ids  # None (always, from serve): the model's
        r.stop_ids = (set() if p.ignore_eos else set(eos)) | set(p.stop_token_ids)
        r.text = TextState(self.tokenizer, p.stop_strings)

    def _iteration(self) -> None:
        rows = self._rows
        now = time.perf_counter()
        for i, r in enumerate(rows):
            if r is not None and r.cancelled:
                self._finish(r, "cancelled")
                rows[i] = None
            elif r is not None and r.expired(now):
                self._expire(r)
                rows[i] = None
        active = [i for i, r in enumerate(rows) if r is not None]
        if self.continuous or not active:
            new = self._admit(self.max_batch - len(active), block=not active)
        else:
            new = []
        if not active and not new:
            return
        width = len(rows)
        capacity = self.max_context
        past = self._mask.shape[1]
        if self._dirty:
            self._dirty = False
            self._rebuild([rows[i] for i in active] + new)
        elif new:
            free_rows = [i for i, r in enumerate(rows) if r is None]
            s = max(len(r.prompt_ids) for r in new)
            if active and len(free_rows) >= len(new) and past + s <= capacity:
                feeds = {i: [rows[i].generated[-1]] for i in active}
                for i, r in zip(free_rows, new):
                    rows[i] = r
                    self._mask[i, :] = 0
                    self._npos[i] = 0
                    feeds[i] = list(r.prompt_ids)
                self.stats.joins += 1
                self._step(feeds, fresh=False)
            else:
                self._rebuild([rows[i] for i in active] + new)
        else:
            shrink = self.continuous and self.shrink_ratio and width > 1 and len(active) * self.shrink_ratio <= width
            if past + 1 > capacity or shrink:
                self._rebuild([rows[i] for i in active])
            else:
                self._step({i: [rows[i].generated[-1]] for i in active}, fresh=False)

    def _rebuild(self, reqs: list[GenRequest]) -> None:
        width = min(self.max_batch, len(reqs) + self._queue.qsize()) if self.continuous else len(reqs)
        self._rows = list(reqs) + [None] * (width - len(reqs))
        self._npos = [0] * width
        self._mask = np.zeros((width, 0), dtype=np.int64)
        feeds = {i: r.prompt_ids + r.generated for i, r in enumerate(reqs)}
        self.stats.rebuilds += 1
        self._step(feeds, fresh=True)

    def _step(self, feeds: dict[int, list[int]], fresh: bool) -> None:
        rows = self._rows
        width = len(rows)
        s = max(len(f) for f in feeds.values())
        ids = np.zeros((width, s), dtype=np.int64)
        chunk = np.zeros((width, s), dtype=np.int64)
        pos = np.zeros((width, s), dtype=np.int64)
        for i in range(width):
            f = feeds.get(i)
            if f is None:  # a free row: one dummy token that only it attends to
                chunk[i, -1] = 1
                continue
            n = len(f)
            ids[i, s - n:] = f
            chunk[i, s - n:] = 1
            pos[i, s - n:] = np.arange(self._npos[i], self._npos[i] + n)
        sess = self.session
        if fresh:
            sess.reset(width, self.max_context)
            mask = chunk
        else:
            mask = np.concatenate([self._mask, chunk], axis=1)
        logits = sess.step(ids, mask, pos, last_only=True)[:, -1, :]
        self._mask = mask
        for i, f in feeds.items():
            self._npos[i] += len(f)
        now = time.perf_counter()
        st = self.stats
        st.steps += 1
        st.rows_stepped += len(feeds)
        st.batch_hist[len(feeds)] = st.batch_hist.get(len(feeds), 0) + 1
        st.max_active = max(st.max_active, len(feeds))
        for i in feeds:
            r = rows[i]
            p = r.params
            try:
                tok = int(sample_next(logits[i], r.rng, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                                      repetition_penalty=p.repetition_penalty, seen=r.seen))
                if r.seen is not None:
                    r.seen[tok] = True
                finished = self._advance(r, tok, now)
            except Exception as e:  # noqa: BLE001 - this row's sampling or text failed: only this row ends
                log.exception("request %d failed", r.id)
                self.stats.errors += 1
                r.emit(ErrorEvent(f"generation failed: {type(e).__name__}: {e}"))
                finished = True
            if finished:
                rows[i] = None

    def _advance(self, r: GenRequest, tok: int, now: float) -> bool:
        """Record one sampled token; True when the request finished."""
        r.generated.append(tok)
        self.stats.tokens += 1
        if r.first_token_at is None:
            r.first_token_at = now
        reason = stop = None
        if tok in r.stop_ids:
            reason, stop = "stop", tok
        else:
            hit = r.text.check_stop(r.generated)
            if hit is not None:
                reason, stop = "stop", hit
            elif len(r.generated) >= r.params.max_new_tokens:
                reason = "length"
        r.emit(TokenEvent(tok, r.text.delta(tok, reason is not None), now))
        if reason is not None:
            self._finish(r, reason, stop, now)
            return True
        return False

    def _finish(self, r: GenRequest, reason: str, stop=None, now: float | None = None) -> None:
        if r.done:
            return
        if reason == "cancelled":
            self.stats.cancelled += 1
        else:
            self.stats.finished += 1
        tail, full = r.text.final(r.generated) if r.text is not None else ("", "")
        r.emit(FinishEvent(reason, tail, full, tuple(r.generated), len(r.prompt_ids), len(r.generated), stop,
                           now or time.perf_counter()))


__all__ = ["Engine", "EngineStats", "EngineStoppedError", "ErrorEvent", "FinishEvent", "GenRequest",
           "InvalidRequestError", "QueueFullError", "TokenEvent", "request_config"]
