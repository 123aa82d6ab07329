"""Server settings (one frozen dataclass; the CLI fills it from its options)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import LlamaTrtError


@dataclass(frozen=True)
class ServeSettings:
    """What the HTTP layer enforces. The scheduler's own knobs live on :class:`Engine`.

    ``api_key``: when set, every endpoint except ``/health`` needs ``Authorization: Bearer KEY``.
    ``max_body_bytes``: larger request bodies get 413 before they are parsed; it also bounds
    the text a request can make the server tokenize or render.
    ``retry_after_s``: the Retry-After header sent with a 503 (queue full).
    ``default_completion_max_tokens``: OpenAI's default for /v1/completions is 16;
    chat completions default to "the rest of the context".
    ``request_timeout_s``: a request still unanswered after this long ends with 504 (None: never).
    ``shutdown_timeout_s``: on SIGTERM, how long running requests may take to finish.
    ``cors_origins``: origins allowed by CORS (none by default: browsers cannot call the API).
    ``max_json_depth``: deeper JSON bodies get 400. ``prepare_threads``: worker threads that
    parse, render templates and tokenize, off the event loop.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    retry_after_s: int = 1
    default_completion_max_tokens: int = 16
    max_stop_sequences: int = 4
    max_prompts_per_request: int = 16
    disconnect_poll_s: float = 0.25
    request_timeout_s: float | None = 600.0
    shutdown_timeout_s: float = 30.0
    cors_origins: tuple[str, ...] = ()
    max_json_depth: int = 32
    prepare_threads: int = 4
    sse_ping_s: float = 15.0

    def __post_init__(self) -> None:
        problems = []
        if not 0 <= self.port <= 65535:
            problems.append(f"--port must be in 0..65535, got {self.port}")
        if self.max_body_bytes < 1:
            problems.append(f"--max-body-bytes must be >= 1, got {self.max_body_bytes}")
        if self.request_timeout_s is not None and not self.request_timeout_s > 0:
            problems.append(f"--request-timeout must be > 0 seconds, got {self.request_timeout_s}")
        if not self.shutdown_timeout_s >= 0:
            problems.append(f"--shutdown-timeout must be >= 0 seconds, got {self.shutdown_timeout_s}")
        if problems:
            raise LlamaTrtError("; ".join(problems))


__all__ = ["ServeSettings"]
