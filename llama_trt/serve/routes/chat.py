"""``POST /v1/chat/completions``: messages rendered with the tokenizer's chat template, JSON or SSE."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from ...runtime.generate import GenerationConfig
from ..http_errors import APIError
from ..protocol import ChatCompletionRequest
from ..serving import ClientGoneError, Serving, finish_reason, parse_body, usage
from .completions import _check_model


@dataclass(frozen=True)
class _Prepared:
    req: ChatCompletionRequest
    ids: list[int]
    params: GenerationConfig


def _messages(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    messages = []
    for m in req.messages:
        content = m.content
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise APIError(400, f"messages: content part type {part.type!r} is not supported (text only)",
                                   param="messages")
                parts.append(part.text)
            content = "".join(parts)
        msg: dict[str, Any] = {"role": m.role, "content": content or ""}
        if m.name:
            msg["name"] = m.name
        messages.append(msg)
    return messages


def _prepare(serving: Serving, raw: bytes) -> _Prepared:
    """Parse, validate, render the template and tokenize (a worker thread)."""
    req = parse_body(raw, ChatCompletionRequest, serving.settings.max_json_depth)
    _check_model(serving, req.model)
    tok = serving.engine.tokenizer
    if tok is None or not tok.chat_template:
        raise APIError(400, "this model has no chat template (chat_template.jinja or tokenizer_config.json "
                            "'chat_template'); start the server with --chat-template FILE or use /v1/completions", param="messages", code="no_chat_template")
    try:
        text = tok.apply_chat_template(_messages(req), add_generation_prompt=True)
    except APIError:
        raise
    except Exception as e:  # noqa: BLE001 - a template can raise anything (raise_exception, sandbox limits)
        raise APIError(400, f"the chat template could not render these messages: {type(e).__name__}: {e}",
                       param="messages", code="chat_template_error") from None
    # the template renders bos_token itself (as transformers' apply_chat_template(tokenize=True))
    ids = serving.encode(text, add_bos=False, param="messages")
    max_tokens = req.max_completion_tokens or req.max_tokens
    return _Prepared(req, ids, serving.sampling(req, serving.checked(ids, max_tokens, None)))


async def create_chat_completion(request: Request):
    serving: Serving = request.app.state.serving
    prepared = await serving.offload(_prepare, serving, await request.body())
    req, model = prepared.req, serving.engine.model_name
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(text: str, reason: str | None, token_ids: list[int]) -> dict:
        delta = {"content": text} if text or reason is None else {}
        return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}

    greq = serving.submit(prepared.ids, prepared.params)
    if req.stream:
        include = bool(req.stream_options and req.stream_options.include_usage)
        first = chunk("", None, []) | {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                    "logprobs": None, "finish_reason": None}]}
        return serving.sse_response(serving.stream(greq, chunk, include, first))
    try:
        ev = await serving.collect(request, greq)
    except ClientGoneError:
        return Response(status_code=499)
    return {"id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": ev.full_text},
                         "logprobs": None, "finish_reason": finish_reason(ev)}],
            "usage": usage(ev.prompt_tokens, ev.completion_tokens)}
