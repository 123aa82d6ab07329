"""The OpenAI-compatible HTTP app: ``create_app(engine, settings)``.

Endpoints: ``GET /health`` (always open), ``GET /v1/models``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (``stream: true`` -> SSE chunks ending with ``data: [DONE]``),
``GET /metrics`` (Prometheus text, this app's own registry).

Errors are OpenAI-shaped ``{"error": {"message", "type", "param", "code"}}``:
malformed JSON 400, schema/type errors 400 (as OpenAI; never FastAPI's 422), unknown model
404, prompt or prompt + max_tokens over the context 400 (code ``context_length_exceeded``),
body over ``max_body_bytes`` 413, missing/wrong bearer token 401, queue full 503 + Retry-After.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import LlamaTrtError
from ..runtime.generate import GenerationConfig
from .engine import (
    Engine, EngineStoppedError, ErrorEvent, FinishEvent, GenRequest, InvalidRequestError, QueueFullError,
    TokenEvent, request_config,
)
from .metrics import Metrics
from .protocol import ChatCompletionRequest, CompletionRequest, describe_validation_error, error_body
from .settings import ServeSettings

OPEN_PATHS = ("/health",)
KNOWN_ENDPOINTS = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")


class BodyTooLargeError(Exception):
    pass


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


class ClientGoneError(Exception):
    pass


def _json_error(status: int, message: str, type_: str = "invalid_request_error", param=None, code=None,
                headers=None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


# ---------------------------------------------------------------------------------------
class _Guard:
    """Pure ASGI middleware: bearer auth, body-size limit, request metrics (works with streaming)."""

    def __init__(self, app, settings: ServeSettings, metrics: Metrics) -> None:
        self.app, self.settings, self.metrics = app, settings, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = path if path in KNOWN_ENDPOINTS else "other"
        status_seen = {"code": 0}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status_seen["code"] = message["status"]
            await send(message)

        try:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            key = self.settings.api_key
            if key and path not in OPEN_PATHS:
                auth = headers.get("authorization", "")
                scheme, _, token = auth.partition(" ")
                if not auth:
                    resp = _json_error(401, "missing API key: send 'Authorization: Bearer <key>'",
                                       "authentication_error", None, "missing_api_key",
                                       {"WWW-Authenticate": "Bearer"})
                    return await resp(scope, receive, send_wrapper)
                if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
                    resp = _json_error(401, "incorrect API key provided", "authentication_error", None,
                                       "invalid_api_key", {"WWW-Authenticate": "Bearer"})
                    return await resp(scope, receive, send_wrapper)
            limit = self.settings.max_body_bytes
            length = headers.get("content-length")
            if length is not None:
                try:
                    too_big = int(length) > limit
                except ValueError:
                    too_big = False
                if too_big:
                    resp = _json_error(413, f"request body of {length} bytes exceeds the limit of {limit} bytes",
                                       "invalid_request_error", None, "request_too_large")
                    return await resp(scope, receive, send_wrapper)
            seen = {"n": 0}

            async def receive_wrapper():
                message = await receive()
                if message["type"] == "http.request":
                    seen["n"] += len(message.get("body", b""))
                    if seen["n"] > limit:
                        raise BodyTooLargeError()
                return message

            await self.app(scope, receive_wrapper, send_wrapper)
        finally:
            if status_seen["code"]:
                self.metrics.requests.labels(endpoint, str(status_seen["code"])).inc()


# ---------------------------------------------------------------------------------------
def create_app(engine: Engine, settings: ServeSettings | None = None) -> FastAPI:
    """An app serving ``engine``. The engine's scheduler starts with the app (lifespan) if it is not running."""
    settings = settings or ServeSettings()
    metrics = Metrics(engine)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        started_here = not engine.running
        engine.start()
        try:
            yield
        finally:
            if started_here:
                engine.stop()

    app = FastAPI(title="llama-trt", version="0.1.0", lifespan=lifespan)
    app.state.engine, app.state.settings, app.state.metrics = engine, settings, metrics
    app.add_middleware(_Guard, settings=settings, metrics=metrics)

    # ---- errors ----------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return _json_error(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)

    @app.exception_handler(BodyTooLargeError)
    async def _too_large(request, exc):
        return _json_error(413, f"request body exceeds the limit of {settings.max_body_bytes} bytes",
                           "invalid_request_error", None, "request_too_large")

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc: RequestValidationError):
        message, param = describe_validation_error(exc.errors())
        return _json_error(400, message, "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _json_error(exc.status_code, str(exc.detail), type_, None, None, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        return _json_error(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

    # ---- helpers ---------------------------------------------------------------------
    async def read_model(request: Request, model_cls):
        raw = await request.body()
        if not raw.strip():
            raise APIError(400, "the request body is empty; send a JSON object")
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"malformed JSON body: {e}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "the request body must be a JSON object")
        try:
            req = model_cls.model_validate(data)
        except ValidationError as e:
            message, param = describe_validation_error(e.errors())
            raise APIError(400, message, param=param) from None
        if req.model != engine.model_name:
            raise APIError(404, f"the model '{req.model}' does not exist; this server serves '{engine.model_name}' "
                                "(see GET /v1/models)", "invalid_request_error", "model", "model_not_found")
        return req

    def sampling(req, max_tokens: int) -> GenerationConfig:
        unsupported = []
        if req.n != 1:
            unsupported.append(("n", "n > 1 is not supported; send separate requests"))
        if req.presence_penalty or req.frequency_penalty:
            unsupported.append(("frequency_penalty" if req.frequency_penalty else "presence_penalty",
                                "presence_penalty / frequency_penalty are not supported; use "
                                "repetition_penalty (extra body, 1.0 = off)"))
        if req.logit_bias:
            unsupported.append(("logit_bias", "logit_bias is not supported"))
        if getattr(req, "logprobs", None):
            unsupported.append(("logprobs", "logprobs are not supported"))
        if getattr(req, "echo", False):
            unsupported.append(("echo", "echo is not supported"))
        if (getattr(req, "best_of", None) or 1) > 1:
            unsupported.append(("best_of", "best_of > 1 is not supported"))
        if getattr(req, "tools", None):
            unsupported.append(("tools", "tools / function calling are not supported"))
        if unsupported:
            param, msg = unsupported[0]
            raise APIError(400, msg, param=param, code="unsupported_parameter")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > settings.max_stop_sequences:
            raise APIError(400, f"stop: at most {settings.max_stop_sequences} stop sequences", param="stop")
        if stops and engine.tokenizer is None:
            raise APIError(400, "stop strings need a tokenizer and this model has none; use stop_token_ids",
                           param="stop")
        return request_config(max_tokens, temperature=float(req.temperature), top_k=int(req.top_k),
                              top_p=float(req.top_p), repetition_penalty=float(req.repetition_penalty),
                              seed=req.seed, stop_strings=tuple(s for s in stops if s),
                              stop_token_ids=tuple(req.stop_token_ids or ()), ignore_eos=bool(req.ignore_eos))

    def encode(text: str, add_bos: bool = True) -> list[int]:
        if engine.tokenizer is None:
            raise APIError(400, "this model has no tokenizer: send the prompt as token ids", param="prompt")
        return engine.tokenizer.encode(text, add_bos=add_bos)

    def checked(ids: list[int], max_tokens: int | None, default: int | None) -> int:
        try:
            if max_tokens is None and default is not None:
                room = engine.check(ids, None)
                return min(default, room)
            return engine.check(ids, max_tokens)
        except InvalidRequestError as e:
            raise APIError(e.status, e.message, param=e.param, code=e.code) from None

    def submit(ids: list[int], params: GenerationConfig) -> GenRequest:
        greq = GenRequest(ids, params, loop=asyncio.get_running_loop())
        try:
            engine.submit(greq)
        except QueueFullError as e:
            raise APIError(503, str(e), "server_overloaded", None, "queue_full",
                           {"Retry-After": str(settings.retry_after_s)}) from None
        except EngineStoppedError as e:
            raise APIError(503, str(e), "server_error", None, "engine_stopped") from None
        return greq

    class _Observer:
        def __init__(self, greq: GenRequest):
            self.greq, self.last = greq, None

        def see(self, ev) -> None:
            if isinstance(ev, TokenEvent):
                if self.last is None:
                    metrics.ttft.observe(max(0.0, ev.t - self.greq.arrival))
                else:
                    metrics.tpot.observe(max(0.0, ev.t - self.last))
                self.last = ev.t
            elif isinstance(ev, FinishEvent) and ev.finish_reason != "cancelled":
                metrics.prompt_tokens.inc(ev.prompt_tokens)
                metrics.generated_tokens.inc(ev.completion_tokens)
                metrics.e2e.observe(max(0.0, ev.t - self.greq.arrival))

    async def collect(request: Request, greq: GenRequest) -> FinishEvent:
        obs = _Observer(greq)
        poll = settings.disconnect_poll_s
        next_check = time.monotonic() + poll
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(greq.events.get(), poll)
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
                    raise APIError(500, ev.message, "server_error")
        finally:
            greq.cancel()  # no-op once finished; frees the slot if we leave early

    def usage(prompt: int, completion: int) -> dict:
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def finish_reason(ev: FinishEvent) -> str:
        return "length" if ev.finish_reason == "length" else "stop"

    def sse(chunks_gen):
        from sse_starlette.sse import EventSourceResponse

        return EventSourceResponse(chunks_gen, ping=15, sep="\n",
                                   headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def stream_events(greq: GenRequest, make_chunk, include_usage: bool, first: dict | None):
        """SSE data lines for one request; the generator's finally frees the slot on disconnect."""
        obs = _Observer(greq)
        try:
            if first is not None:
                yield {"data": json.dumps(first)}
            while True:
                ev = await greq.events.get()
                obs.see(ev)
                if isinstance(ev, TokenEvent):
                    if ev.text or engine.tokenizer is None:
                        yield {"data": json.dumps(make_chunk(ev.text, None, [ev.token_id]))}
                elif isinstance(ev, FinishEvent):
                    final = make_chunk(ev.text, finish_reason(ev), [])
                    yield {"data": json.dumps(final)}
                    if include_usage:
                        u = make_chunk("", None, []) | {"choices": [],
                                                       "usage": usage(ev.prompt_tokens, ev.completion_tokens)}
                        yield {"data": json.dumps(u)}
                    yield {"data": "[DONE]"}
                    return
                elif isinstance(ev, ErrorEvent):
                    yield {"data": json.dumps(error_body(ev.message, "server_error"))}
                    yield {"data": "[DONE]"}
                    return
        finally:
            greq.cancel()

    # ---- routes ----------------------------------------------------------------------
    @app.get("/health")
    async def health():
        ok = engine.running
        body = {"status": "ok" if ok else "stopped", "model": engine.model_name,
                "active": engine.active_count, "queued": engine.queue_depth, "max_batch": engine.max_batch}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": engine.model_name, "object": "model", "created": engine.created, "owned_by": "llama-trt",
            "max_model_len": engine.max_context,
        }]}

    @app.get("/metrics")
    async def prom():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req: CompletionRequest = await read_model(request, CompletionRequest)
        p = req.prompt
        if isinstance(p, str):
            prompts = [encode(p)]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [list(p)]
        elif p and all(isinstance(x, str) for x in p):
            prompts = [encode(x) for x in p]
        elif p:
            prompts = [list(x) for x in p]
        else:
            raise APIError(400, "prompt: the prompt is empty", param="prompt")
        if len(prompts) > settings.max_prompts_per_request:
            raise APIError(400, f"prompt: at most {settings.max_prompts_per_request} prompts per request",
                           param="prompt")
        if req.stream and len(prompts) > 1:
            raise APIError(400, "streaming supports one prompt per request", param="prompt")
        plist = [(ids, checked(ids, req.max_tokens, settings.default_completion_max_tokens)) for ids in prompts]
        params = [sampling(req, mt) for _, mt in plist]
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text: str, reason: str | None, token_ids: list[int]) -> dict:
            choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": reason}
            if engine.tokenizer is None:
                choice["token_ids"] = token_ids
            return {"id": cid, "object": "text_completion", "created": created, "model": engine.model_name,
                    "choices": [choice]}

        if req.stream:
            greq = submit(plist[0][0], params[0])
            include = bool(req.stream_options and req.stream_options.include_usage)
            return sse(stream_events(greq, chunk, include, None))
        greqs: list[GenRequest] = []
        try:
            for (ids, _), sp in zip(plist, params):
                greqs.append(submit(ids, sp))
            results = [await collect(request, g) for g in greqs]
        except ClientGoneError:
            return Response(status_code=499)
        finally:
            for g in greqs:
                g.cancel()
        choices = []
        for i, ev in enumerate(results):
            c = {"text": ev.full_text, "index": i, "logprobs": None, "finish_reason": finish_reason(ev)}
            if engine.tokenizer is None:
                c["token_ids"] = list(ev.token_ids)
            choices.append(c)
        return {"id": cid, "object": "text_completion", "created": created, "model": engine.model_name,
                "choices": choices, "usage": usage(sum(e.prompt_tokens for e in results),
                                                   sum(e.completion_tokens for e in results))}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req: ChatCompletionRequest = await read_model(request, ChatCompletionRequest)
        tok = engine.tokenizer
        if tok is None or not tok.chat_template:
            raise APIError(400, "this model has no chat template (tokenizer_config.json 'chat_template'); "
                                "use /v1/completions", param="messages", code="no_chat_template")
        messages = []
        for m in req.messages:
            content = m.content
            if isinstance(content, list):
                parts = []
                for part in content:
                    if part.type != "text" or part.text is None:
                        raise APIError(400, f"messages: content part type {part.type!r} is not supported "
                                            "(text only)", param="messages")
                    parts.append(part.text)
                content = "".join(parts)
            msg: dict[str, Any] = {"role": m.role, "content": content or ""}
            if m.name:
                msg["name"] = m.name
            messages.append(msg)
        try:
            text = tok.apply_chat_template(messages, add_generation_prompt=True)
        except LlamaTrtError as e:
            raise APIError(400, str(e), param="messages") from None
        # the template renders bos_token itself (as transformers' apply_chat_template(tokenize=True))
        ids = encode(text, add_bos=False)
        max_tokens = req.max_completion_tokens or req.max_tokens
        sp = sampling(req, checked(ids, max_tokens, None))
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text: str, reason: str | None, token_ids: list[int]) -> dict:
            delta = {"content": text} if text or reason is None else {}
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": engine.model_name,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}

        greq = submit(ids, sp)
        if req.stream:
            include = bool(req.stream_options and req.stream_options.include_usage)
            first = chunk("", None, []) | {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                        "logprobs": None, "finish_reason": None}]}
            return sse(stream_events(greq, chunk, include, first))
        try:
            ev = await collect(request, greq)
        except ClientGoneError:
            return Response(status_code=499)
        return {"id": cid, "object": "chat.completion", "created": created, "model": engine.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": ev.full_text},
                             "logprobs": None, "finish_reason": finish_reason(ev)}],
                "usage": usage(ev.prompt_tokens, ev.completion_tokens)}

    return app


__all__ = ["create_app"]
