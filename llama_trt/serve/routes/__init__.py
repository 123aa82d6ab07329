"""One module per endpoint (as vLLM's serving_completion / serving_chat): each reads on its own.

``register(app)`` mounts them all; a route finds its :class:`~llama_trt.serve.serving.Serving`
on ``request.app.state.serving``.
"""

from __future__ import annotations

import functools

from fastapi import FastAPI

from ..http_errors import APIError, BodyTooLargeError, internal_error


def answered(handler):
    """Route wrapper: a bug of ours becomes a 500 response instead of an exception that would
    reset the client's keep-alive connection."""

    @functools.wraps(handler)
    async def wrapper(request):
        try:
            return await handler(request)
        except (APIError, BodyTooLargeError):
            raise
        except Exception as e:  # noqa: BLE001
            return internal_error(e)

    return wrapper


def register(app: FastAPI) -> None:
    from . import chat, completions, info

    app.add_api_route("/health", info.health, methods=["GET"])
    app.add_api_route("/v1/models", info.models, methods=["GET"])
    app.add_api_route("/metrics", info.metrics, methods=["GET"])
    app.add_api_route("/v1/completions", answered(completions.create_completion), methods=["POST"])
    app.add_api_route("/v1/chat/completions", answered(chat.create_chat_completion), methods=["POST"])


__all__ = ["answered", "register"]
