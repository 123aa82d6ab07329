"""OpenAI-shaped HTTP errors: the exception routes raise and the handlers that answer them.

Every error is answered as a response (never re-raised to the server), so a bad request
never resets a keep-alive connection.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .protocol import describe_validation_error, error_body

log = logging.getLogger("llama_trt.serve")


class BodyTooLargeError(Exception):
    """The body grew past ``max_body_bytes`` while it was read (no or a lying Content-Length)."""


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


def _utf8_safe(text):
    """A message or param may quote the client's text, lone surrogates included: UTF-8 cannot carry
    those, so they are shown as ``\\udXXX`` (else rendering the error body raises and the client gets a 500)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8") if isinstance(text, str) else text


def json_error(status: int, message: str, type_: str = "invalid_request_error", param=None, code=None,
               headers=None) -> JSONResponse:
    body = error_body(_utf8_safe(message), type_, _utf8_safe(param), code)
    return JSONResponse(body, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI, max_body_bytes: int) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return json_error(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)

    @app.exception_handler(BodyTooLargeError)
    async def _too_large(request, exc):
        return json_error(413, f"request body exceeds the limit of {max_body_bytes} bytes",
                          "invalid_request_error", None, "request_too_large")

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc: RequestValidationError):
        message, param = describe_validation_error(exc.errors())
        return json_error(400, message, "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return json_error(exc.status_code, str(exc.detail), type_, None, None, getattr(exc, "headers", None))


def internal_error(exc: BaseException) -> JSONResponse:
    """A 500 for a bug of ours, answered (not raised) so the connection stays usable."""
    log.exception("internal error", exc_info=exc)
    return json_error(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")


__all__ = ["APIError", "BodyTooLargeError", "install_error_handlers", "internal_error", "json_error"]
