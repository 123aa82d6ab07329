"""The ASGI middleware in front of every route: bearer auth, JSON-only POST bodies, the body
size limit and per-endpoint request metrics (pure ASGI, so it works with streaming)."""

from __future__ import annotations

import hmac

from .http_errors import BodyTooLargeError, json_error
from .metrics import Metrics
from .settings import ServeSettings

OPEN_PATHS = ("/health",)
KNOWN_ENDPOINTS = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")


def _refusal(headers: dict, method: str, path: str, settings: ServeSettings):
    """The error response this request gets before any route runs, or None."""
    key = settings.api_key
    if key and path not in OPEN_PATHS:
        auth = headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if not auth:
            return json_error(401, "missing API key: send 'Authorization: Bearer <key>'", "authentication_error",
                              None, "missing_api_key", {"WWW-Authenticate": "Bearer"})
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            return json_error(401, "incorrect API key provided", "authentication_error", None, "invalid_api_key",
                              {"WWW-Authenticate": "Bearer"})
    if method == "POST":
        # A browser may POST text/plain cross-origin without a preflight; JSON only closes that door.
        media = headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "application/json":
            return json_error(415, f"the request body must be JSON sent with 'Content-Type: application/json' "
                                   f"(got {media or 'no Content-Type'})", "invalid_request_error", None,
                              "unsupported_media_type")
    length = headers.get("content-length")
    limit = settings.max_body_bytes
    if length is not None and length.strip().isdigit() and int(length) > limit:
        return json_error(413, f"request body of {length} bytes exceeds the limit of {limit} bytes",
                          "invalid_request_error", None, "request_too_large")
    return None


class Guard:
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
            refusal = _refusal(headers, scope.get("method", "GET"), path, self.settings)
            if refusal is not None:
                return await refusal(scope, receive, send_wrapper)
            limit, seen = self.settings.max_body_bytes, {"n": 0}

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


__all__ = ["Guard", "KNOWN_ENDPOINTS", "OPEN_PATHS"]
