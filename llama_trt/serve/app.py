"""The OpenAI-compatible HTTP app: ``create_app(engine, settings)``.

Endpoints (one module each under ``routes/``): ``GET /health`` (always open), ``GET /v1/models``,
``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` -> SSE chunks ending
with ``data: [DONE]``), ``GET /metrics`` (Prometheus text, this app's own registry).

Errors are OpenAI-shaped ``{"error": {"message", "type", "param", "code"}}``:
malformed JSON, schema/type errors, invalid Unicode, too deep nesting and failing chat
templates 400 (as OpenAI; never FastAPI's 422), unknown model 404, prompt or prompt +
max_tokens over the context 400 (code ``context_length_exceeded``), body over
``max_body_bytes`` 413, a POST body not sent as ``application/json`` 415, missing/wrong
bearer token 401, queue full or shutting down 503 + Retry-After, past the deadline 504.
"""

from __future__ import annotations

import contextlib

from fastapi import FastAPI

from .engine import Engine
from .guard import Guard
from .http_errors import install_error_handlers
from .metrics import Metrics
from .routes import register
from .serving import Serving
from .settings import ServeSettings


def create_app(engine: Engine, settings: ServeSettings | None = None) -> FastAPI:
    """An app serving ``engine``. The engine's scheduler starts with the app (lifespan) if it is not running."""
    settings = settings or ServeSettings()
    serving = Serving(engine, settings, Metrics(engine))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        started_here = not engine.running
        engine.start()
        serving.open()
        try:
            yield
        finally:
            serving.close()
            if started_here:
                engine.stop()

    app = FastAPI(title="llama-trt", version="0.1.0", lifespan=lifespan)
    app.state.serving = serving
    app.state.engine, app.state.settings, app.state.metrics = engine, settings, serving.metrics
    app.add_middleware(Guard, settings=settings, metrics=serving.metrics)
    if settings.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    install_error_handlers(app, settings.max_body_bytes)
    register(app)
    return app


__all__ = ["create_app"]
