"""``POST /v1/completions``: one or several prompts (text or token ids), JSON or SSE."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import Response

from ...runtime.generate import GenerationConfig
from ..http_errors import APIError
from ..protocol import CompletionRequest
from ..serving import ClientGoneError, Serving, finish_reason, parse_body, usage


@dataclass(frozen=True)
class _Prepared:
    req: CompletionRequest
    prompts: list[tuple[list[int], GenerationConfig]]


def _prepare(serving: Serving, raw: bytes) -> _Prepared:
    """Parse, validate and tokenize (a worker thread)."""
    settings = serving.settings
    req = parse_body(raw, CompletionRequest, settings.max_json_depth)
    _check_model(serving, req.model)
    p = req.prompt
    if isinstance(p, str):
        prompts = [serving.encode(p)]
    elif p and all(isinstance(x, int) for x in p):
        prompts = [list(p)]
    elif p and all(isinstance(x, str) for x in p):
        prompts = [serving.encode(x) for x in p]
    elif p:
        prompts = [list(x) for x in p]
    else:
        raise APIError(400, "prompt: the prompt is empty", param="prompt")
    if len(prompts) > settings.max_prompts_per_request:
        raise APIError(400, f"prompt: at most {settings.max_prompts_per_request} prompts per request", param="prompt")
    if req.stream and len(prompts) > 1:
        raise APIError(400, "streaming supports one prompt per request", param="prompt")
    checked = [(ids, serving.checked(ids, req.max_tokens, settings.default_completion_max_tokens)) for ids in prompts]
    return _Prepared(req, [(ids, serving.sampling(req, max_tokens)) for ids, max_tokens in checked])


def _check_model(serving: Serving, model: str) -> None:
    name = serving.engine.model_name
    if model != name:
        raise APIError(404, f"the model '{model}' does not exist; this server serves '{name}' (see GET /v1/models)",
                       "invalid_request_error", "model", "model_not_found")


async def create_completion(request: Request):
    serving: Serving = request.app.state.serving
    prepared = await serving.offload(_prepare, serving, await request.body())
    req, engine = prepared.req, serving.engine
    cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(text: str, reason: str | None, token_ids: list[int]) -> dict:
        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": reason}
        if engine.tokenizer is None:
            choice["token_ids"] = token_ids
        return {"id": cid, "object": "text_completion", "created": created, "model": engine.model_name,
                "choices": [choice]}

    if req.stream:
        greq = serving.submit(*prepared.prompts[0])
        include = bool(req.stream_options and req.stream_options.include_usage)
        return serving.sse_response(serving.stream(greq, chunk, include, None))
    greqs = []
    try:
        for ids, params in prepared.prompts:
            greqs.append(serving.submit(ids, params))
        results = [await serving.collect(request, g) for g in greqs]
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
