"""Server settings (one frozen dataclass; the CLI fills it from its options)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServeSettings:
    """What the HTTP layer enforces. The scheduler's own knobs live on :class:`Engine`.

    ``api_key``: when set, every endpoint except ``/health`` needs ``Authorization: Bearer KEY``.
    ``max_body_bytes``: larger request bodies get 413 before they are parsed.
    ``retry_after_s``: the Retry-After header sent with a 503 (queue full).
    ``default_completion_max_tokens``: OpenAI's default for /v1/completions is 16;
    chat completions default to "the rest of the context".
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


__all__ = ["ServeSettings"]
