"""What every generation route shares: the body parser, sampling parameters, admission,
and the two ways of answering (one JSON response, or an SSE stream).

Everything CPU-heavy a request can cause (JSON parsing, template rendering, tokenization,
bounded by ``max_body_bytes``) runs in :meth:`Serving.offload`'s worker threads, never on
the event loop, so ``/health`` and running streams stay responsive.
"""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from pydantic import ValidationError

from ..errors import LlamaTrtError
from ..runtime.generate import GenerationConfig
from .engine import (
    Engine, EngineStoppedError, ErrorEvent, FinishEvent, GenRequest, InvalidRequestError, QueueFullError,
    TokenEvent, request_config,
)
from .http_errors import APIError
from .metrics import Metrics
from .protocol import describe_validation_error, error_body
from .settings import ServeSettings

# seconds (at most; never more than the timeout itself) the HTTP side waits past a request's
# deadline for the scheduler's own 504, e.g. while a step is stuck
DEADLINE_GRACE_S = 5.0


class ClientGoneError(Exception):
    pass


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _check_tree(data: Any, max_depth: int) -> None:
    """Refuse nesting deeper than ``max_depth`` and strings that are not valid Unicode
    (lone surrogates such as ``"\\ud800"``: no tokenizer or JSON encoder can take them).
    Iterative, so a deep body cannot exhaust the stack here."""
    stack = [(data, 1, "")]
    while stack:
        value, depth, path = stack.pop()
        if depth > max_depth:
            raise APIError(400, f"the JSON body is nested more than {max_depth} levels deep", param=path or None,
                           code="invalid_json")
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise APIError(400, f"{path or 'body'}: the text is not valid Unicode (a lone surrogate such as "
                                    "\\ud800); send UTF-8 text", param=path or None, code="invalid_unicode") from None
        elif isinstance(value, dict):
            for k, v in value.items():
                stack.append((k, depth + 1, path))
                stack.append((v, depth + 1, f"{path}.{k}" if path else str(k)))
        elif isinstance(value, list):
            stack.extend((v, depth + 1, path) for v in value)


def parse_body(raw: bytes, model_cls, max_depth: int):
    """The request model for a raw body, or an :class:`APIError` 400 naming the problem."""
    if not raw.strip():
        raise APIError(400, "the request body is empty; send a JSON object")
    try:
        data = json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        raise APIError(400, "the JSON body is nested too deeply", code="invalid_json") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"malformed JSON body: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    _check_tree(data, max_depth)
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        message, param = describe_validation_error(e.errors())
        raise APIError(400, message, param=param) from None


_UNSUPPORTED = (
    ("n", lambda r: r.n != 1, "n > 1 is not supported; send separate requests"),
    ("frequency_penalty", lambda r: r.frequency_penalty, "presence_penalty / frequency_penalty are not supported; "
                                                         "use repetition_penalty (extra body, 1.0 = off)"),
    ("presence_penalty", lambda r: r.presence_penalty, "presence_penalty / frequency_penalty are not supported; "
                                                       "use repetition_penalty (extra body, 1.0 = off)"),
    ("logit_bias", lambda r: r.logit_bias, "logit_bias is not supported"),
    ("logprobs", lambda r: getattr(r, "logprobs", None), "logprobs are not supported"),
    ("echo", lambda r: getattr(r, "echo", False), "echo is not supported"),
    ("best_of", lambda r: (getattr(r, "best_of", None) or 1) > 1, "best_of > 1 is not supported"),
    ("tools", lambda r: getattr(r, "tools", None), "tools / function calling are not supported"),
)


@dataclass
class Serving:
    """The engine, the settings and the metrics one app serves with, plus its worker threads."""

    engine: Engine
    settings: ServeSettings
    metrics: Metrics
    _pool: ThreadPoolExecutor | None = field(default=None, repr=False)

    def open(self) -> None:
        self._pool = ThreadPoolExecutor(self.settings.prepare_threads, thread_name_prefix="llama-trt-prepare")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    async def offload(self, fn: Callable, *args):
        """Run ``fn(*args)`` in a worker thread (the event loop keeps serving meanwhile)."""
        if self._pool is None:
            self.open()
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # ---- synchronous preparation (worker threads) ------------------------------------------
    def encode(self, text: str, add_bos: bool = True, param: str = "prompt") -> list[int]:
        if self.engine.tokenizer is None:
            raise APIError(400, "this model has no tokenizer: send the prompt as token ids", param=param)
        return self.engine.tokenizer.encode(text, add_bos=add_bos)

    def checked(self, ids: list[int], max_tokens: int | None, default: int | None) -> int:
        try:
            if max_tokens is None and default is not None:
                return min(default, self.engine.check(ids, None))
            return self.engine.check(ids, max_tokens)
        except InvalidRequestError as e:
            raise APIError(e.status, e.message, param=e.param, code=e.code) from None

    def sampling(self, req, max_tokens: int) -> GenerationConfig:
        for param, refused, message in _UNSUPPORTED:
            if refused(req):
                raise APIError(400, message, param=param, code="unsupported_parameter")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > self.settings.max_stop_sequences:
            raise APIError(400, f"stop: at most {self.settings.max_stop_sequences} stop sequences", param="stop")
        if stops and self.engine.tokenizer is None:
            raise APIError(400, "stop strings need a tokenizer and this model has none; use stop_token_ids",
                           param="stop")
        try:
            return request_config(max_tokens, temperature=float(req.temperature), top_k=int(req.top_k),
                                  top_p=float(req.top_p), repetition_penalty=float(req.repetition_penalty),
                                  seed=req.seed, stop_strings=tuple(s for s in stops if s),
                                  stop_token_ids=tuple(req.stop_token_ids or ()), ignore_eos=bool(req.ignore_eos))
        except LlamaTrtError as e:  # GenerationConfig's own checks: the last line before the scheduler
            raise APIError(400, str(e)) from None

    # ---- admission and answers (event loop) ------------------------------------------------
    def submit(self, ids: list[int], params: GenerationConfig) -> GenRequest:
        greq = GenRequest(ids, params, loop=asyncio.get_running_loop(), timeout_s=self.settings.request_timeout_s)
        try:
            self.engine.submit(greq)
        except QueueFullError as e:
            raise APIError(503, str(e), "server_overloaded", None, "queue_full",
                           {"Retry-After": str(self.settings.retry_after_s)}) from None
        except EngineStoppedError as e:
            raise APIError(503, str(e), "server_error", None, "engine_stopped",
                           {"Retry-After": str(self.settings.retry_after_s)}) from None
        return greq

    def _wait_budget(self, greq: GenRequest) -> float:
        """Seconds left before the HTTP side gives up on the scheduler (inf: no deadline)."""
        if greq.deadline is None:
            return float("inf")
        grace = min(DEADLINE_GRACE_S, self.settings.request_timeout_s or DEADLINE_GRACE_S)
        return greq.deadline + grace - time.perf_counter()

    async def collect(self, request, greq: GenRequest) -> FinishEvent:
        """Wait for one request's result, watching for a client that went away."""
        obs = _Observer(self.metrics, greq)
        poll = self.settings.disconnect_poll_s
        next_check = time.monotonic() + poll
        try:
            while True:
                budget = self._wait_budget(greq)
                if budget <= 0:
                    raise APIError(504, "the request ran past its deadline", "server_error", None, "timeout")
                try:
                    ev = await asyncio.wait_for(greq.events.get(), min(poll, budget))
                except asyncio.TimeoutError:
                    ev = None
                if time.monotonic() >= next_check:  # also while tokens keep coming
                    next_check = time.monotonic() + poll
                    if await request.is_disconnected():
                        raise ClientGoneError() from None
                if ev is None:
                    continue
                obs.see(ev)
                if isinstance(ev, FinishEvent):
                    return ev
                if isinstance(ev, ErrorEvent):
                    type_ = "invalid_request_error" if ev.status < 500 else "server_error"
                    raise APIError(ev.status, ev.message, type_, None, ev.code)
        finally:
            greq.cancel()  # no-op once finished; frees the slot if we leave early

    async def stream(self, greq: GenRequest, make_chunk: Callable, include_usage: bool,
                     first: dict | None) -> AsyncIterator[str]:
        """SSE lines for one request. Every stream ends with ``data: [DONE]``, after an error
        event when it could not finish; the ``finally`` frees the slot on disconnect."""
        obs = _Observer(self.metrics, greq)
        tokenizer = self.engine.tokenizer
        try:
            if first is not None:
                yield _sse(first)
            while True:
                budget = self._wait_budget(greq)
                if budget <= 0:
                    yield _sse(error_body("the request ran past its deadline", "server_error", None, "timeout"))
                    break
                try:
                    ev = await asyncio.wait_for(greq.events.get(), min(self.settings.sse_ping_s, budget))
                except asyncio.TimeoutError:
                    yield ": ping\n\n"
                    continue
                obs.see(ev)
                if isinstance(ev, TokenEvent):
                    if ev.text or tokenizer is None:
                        yield _sse(make_chunk(ev.text, None, [ev.token_id]))
                elif isinstance(ev, FinishEvent):
                    yield _sse(make_chunk(ev.text, finish_reason(ev), []))
                    if include_usage:
                        yield _sse(make_chunk("", None, []) | {"choices": [], "usage": usage(ev.prompt_tokens,
                                                                                           ev.completion_tokens)})
                    break
                elif isinstance(ev, ErrorEvent):
                    type_ = "invalid_request_error" if ev.status < 500 else "server_error"
                    yield _sse(error_body(ev.message, type_, None, ev.code))
                    break
            yield "data: [DONE]\n\n"
        finally:
            greq.cancel()

    def sse_response(self, lines: AsyncIterator[str]):
        from starlette.responses import StreamingResponse

        return StreamingResponse(lines, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


class _Observer:
    """Feeds TTFT / TPOT / end-to-end latency and token counters from a request's events."""

    def __init__(self, metrics: Metrics, greq: GenRequest):
        self.metrics, self.greq, self.last = metrics, greq, None

    def see(self, ev) -> None:
        m = self.metrics
        if isinstance(ev, TokenEvent):
            if self.last is None:
                m.ttft.observe(max(0.0, ev.t - self.greq.arrival))
            else:
                m.tpot.observe(max(0.0, ev.t - self.last))
            self.last = ev.t
        elif isinstance(ev, FinishEvent) and ev.finish_reason != "cancelled":
            m.prompt_tokens.inc(ev.prompt_tokens)
            m.generated_tokens.inc(ev.completion_tokens)
            m.e2e.observe(max(0.0, ev.t - self.greq.arrival))


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def finish_reason(ev: FinishEvent) -> str:
    return "length" if ev.finish_reason == "length" else "stop"


__all__ = ["ClientGoneError", "Serving", "finish_reason", "parse_body", "usage"]
