"""``GET /health`` (always open), ``GET /v1/models``, ``GET /metrics`` (Prometheus text)."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse, Response


async def health(request: Request):
    engine = request.app.state.serving.engine
    ok = engine.running and not engine.draining
    body = {"status": "ok" if ok else ("draining" if engine.running else "stopped"), "model": engine.model_name,
            "active": engine.active_count, "queued": engine.queue_depth, "max_batch": engine.max_batch}
    return JSONResponse(body, status_code=200 if ok else 503)


async def models(request: Request):
    engine = request.app.state.serving.engine
    return {"object": "list", "data": [{
        "id": engine.model_name, "object": "model", "created": engine.created, "owned_by": "llama-trt",
        "max_model_len": engine.max_context,
    }]}


async def metrics(request: Request):
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return Response(generate_latest(request.app.state.serving.metrics.registry), media_type=CONTENT_TYPE_LATEST)
