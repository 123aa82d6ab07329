"""A multi-turn chat over a session: history rendered with the chat template, trimmed to the context.

Library only (``llama-trt chat`` is its thin CLI). Each exchange (:meth:`Chat.start`, then
:meth:`Chat.stream`; :meth:`Chat.send` for both) renders the whole
history + the new user message with the tokenizer's template (``add_generation_prompt``), drops
the oldest user/assistant exchanges while prompt + ``max_new_tokens`` would not fit the
context (the system prompt always stays), streams the reply and keeps it in the history.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..errors import GenerationError
from .generate import GenerationConfig, GenerationResult, stream
from .tokenizer import Tokenizer


@dataclass
class ChatTurn:
    """One exchange: the user's message, the prompt ids (history + message), how many old messages
    were dropped to fit them, and, once streamed, the reply."""

    user: str
    prompt_ids: list[int]
    dropped_messages: int = 0
    reply: str = ""
    result: GenerationResult | None = None


@dataclass
class Chat:
    session: Any
    tokenizer: Tokenizer
    config: GenerationConfig = field(default_factory=GenerationConfig)
    system: str | None = None
    history: list[dict[str, str]] = field(default_factory=list)  # user/assistant messages, oldest first

    def __post_init__(self) -> None:
        if not self.tokenizer.chat_template:
            raise GenerationError(f"{self.tokenizer.path.parent} has no chat template; pass --chat-template FILE")

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.history.clear()

    def messages(self, user: str | None = None) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history + ([{"role": "user", "content": user}] if user is not None else [])

    def prompt_ids(self, user: str) -> tuple[list[int], int]:
        """Ids of history + ``user`` ready for the reply, and how many old messages were dropped to fit."""
        budget = int(self.session.max_context) - self.config.max_new_tokens
        dropped = 0
        while True:
            ids = self.tokenizer.encode_chat(self.messages(user), add_generation_prompt=True)
            if len(ids) <= budget:
                break
            if not self.history:
                raise GenerationError(
                    f"the message needs {len(ids)} tokens but the context of {self.session.max_context} leaves "
                    f"{budget} after max_new_tokens {self.config.max_new_tokens}; send a shorter message or lower "
                    "--max-new-tokens")
            n = 2 if len(self.history) >= 2 else 1  # the oldest user message and its reply
            del self.history[:n]
            dropped += n
        return ids, dropped

    def start(self, user: str) -> ChatTurn:
        """Render and fit the prompt for ``user`` (old messages may be dropped: see ``dropped_messages``)."""
        ids, dropped = self.prompt_ids(user)
        return ChatTurn(user=user, prompt_ids=ids, dropped_messages=dropped)

    def stream(self, turn: ChatTurn) -> Iterator[str]:
        """Stream the reply's text; at the end the exchange joins the history and ``turn.reply`` is set."""
        gen = stream(self.session, turn.prompt_ids, self.config, self.tokenizer)
        for chunk in gen:
            if chunk.text:
                yield chunk.text
        turn.result = gen.result
        turn.reply = gen.result.text or ""
        self.history += [{"role": "user", "content": turn.user}, {"role": "assistant", "content": turn.reply}]

    def send(self, user: str) -> ChatTurn:
        """One whole exchange without streaming."""
        turn = self.start(user)
        for _ in self.stream(turn):
            pass
        return turn


__all__ = ["Chat", "ChatTurn"]
