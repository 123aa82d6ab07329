"""Generation: prefill + decode loop over any :class:`Session`, batched with left padding.

``generate`` (one prompt) and ``generate_batch`` (several, any lengths) return
:class:`GenerationResult`; ``stream`` yields :class:`StreamChunk` (token id + text delta)
as tokens are produced. Prompts are token ids or, with a tokenizer, text.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator, Sequence

import numpy as np

from ..errors import GenerationError
from .sampling import sample_next
from .sessions.base import Session
from .tokenizer import StreamDecoder, Tokenizer


@dataclass(frozen=True)
class GenerationConfig:
    """How to generate. temperature 0 = greedy; top_k 0 and top_p 1 = off."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    eos_token_ids: tuple[int, ...] | None = None  # None: the model's (config / tokenizer)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_token_ids", tuple(int(i) for i in self.stop_token_ids))
        object.__setattr__(self, "stop_strings", tuple(str(s) for s in self.stop_strings if s))
        if self.eos_token_ids is not None:
            object.__setattr__(self, "eos_token_ids", tuple(int(i) for i in self.eos_token_ids))
        problems = []
        for name in ("temperature", "top_p", "repetition_penalty"):
            if not math.isfinite(getattr(self, name)):
                problems.append(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**64):
            problems.append(f"seed must be an integer in 0..2**64-1, got {self.seed!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1, got {self.max_new_tokens!r}")
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            problems.append(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if problems:
            raise GenerationError("; ".join(problems))


@dataclass
class GenerationResult:
    token_ids: list[int]              # generated ids only (a stop/eos token that ended it included)
    text: str | None                  # decoded generated text (stop string cut off); None without tokenizer
    finish_reason: str                # "stop" (eos / stop id / stop string) or "length"
    prompt_tokens: int
    prefill_ms: float                 # time to first token: prefill forward + first sample
    decode_ms: float
    decode_tokens_per_s: float        # decode steps per second for this sequence (after the first token)
    backend: str = ""
    batch: int = 1
    stop: str | int | None = None     # what stopped it
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class StreamChunk:
    token_id: int | None  # None only for a final chunk of held-back text
    text: str  # the new text (may be "" while a character or a stop string is pending)


def _as_ids(prompt, tokenizer: Tokenizer | None) -> list[int]:
    if isinstance(prompt, str):
        if tokenizer is None:
            raise GenerationError("a text prompt needs a tokenizer; pass token ids (--prompt-ids) or a tokenizer")
        ids = tokenizer.encode(prompt)
    else:
        try:
            ids = [int(i) for i in np.asarray(prompt, dtype=np.int64).reshape(-1)]
        except OverflowError:  # an id past int64 cannot be in any vocabulary
            raise GenerationError("a prompt token id is outside the vocabulary (and outside int64)") from None
    if not ids:
        raise GenerationError("the prompt is empty; give at least one token")
    return ids


def check_request(prompts: Sequence[Sequence[int]], cfg: GenerationConfig, session: Session) -> None:
    """Refuse before running anything: empty prompts, ids outside the vocab, too long for the context."""
    if not prompts:
        raise GenerationError("no prompts given")
    vocab = session.config.vocab_size
    for p in prompts:
        if not len(p):
            raise GenerationError("the prompt is empty; give at least one token")
        bad = [i for i in p if not 0 <= i < vocab]
        if bad:
            raise GenerationError(f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
    n = max(len(p) for p in prompts)
    c = session.max_context
    if n + cfg.max_new_tokens > c:
        raise GenerationError(
            f"prompt of {n} tokens + max_new_tokens {cfg.max_new_tokens} exceeds the context of {c}; "
            "shorten the prompt or lower --max-new-tokens"
        )


class _Run:
    """One batched generation; iterate to get each step's new token per row (None once finished)."""

    def __init__(self, session: Session, prompts, cfg: GenerationConfig, tokenizer: Tokenizer | None) -> None:
        self.session, self.cfg, self.tok = session, cfg, tokenizer
        self.prompts = [_as_ids(p, tokenizer) for p in prompts] if prompts else []
        check_request(self.prompts, cfg, session)
        if cfg.stop_strings and tokenizer is None:
            raise GenerationError("stop strings need a tokenizer; use stop token ids instead")
        eos = cfg.eos_token_ids
        if eos is None:
            eos = tuple(session.config.eos_token_id)
            if tokenizer is not None:  # the eos token and generation_config.json's eos list
                eos = (*eos, *(i for i in tokenizer.eos_ids if i not in eos))
        self.stop_ids = set() if cfg.ignore_eos else set(eos)
        self.stop_ids |= set(cfg.stop_token_ids)
        b = len(self.prompts)
        self.generated: list[list[int]] = [[] for _ in range(b)]
        self.finish: list[str | None] = [None] * b
        self.stop_what: list = [None] * b
        self.texts: list[str | None] = [None] * b
        self._detok = [StreamDecoder(tokenizer) for _ in range(b)] if tokenizer is not None and cfg.stop_strings else None
        self.prefill_ms = 0.0
        self.decode_s = 0.0
        self.steps = 0

    def _check_stop(self, r: int, tok: int) -> None:
        cfg = self.cfg
        self.generated[r].append(tok)
        if tok in self.stop_ids:
            self.finish[r], self.stop_what[r] = "stop", tok
            return
        if self._detok is not None:
            self._detok[r].push(tok)
            text = self.tok.decode(self.generated[r])
            hits = [(text.find(s), s) for s in cfg.stop_strings if s in text]
            if hits:
                pos, s = min(hits)
                self.texts[r] = text[:pos]
                self.finish[r], self.stop_what[r] = "stop", s
                return
        if len(self.generated[r]) >= cfg.max_new_tokens:
            self.finish[r] = "length"

    def __iter__(self) -> Iterator[list[int | None]]:
        s, cfg = self.session, self.cfg
        b = len(self.prompts)
        width = max(len(p) for p in self.prompts)
        ids = np.zeros((b, width), dtype=np.int64)
        mask = np.zeros((b, width), dtype=np.int64)
        for r, p in enumerate(self.prompts):
            ids[r, width - len(p):] = p
            mask[r, width - len(p):] = 1
        pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
        vocab = s.config.vocab_size
        seen = np.zeros((b, vocab), dtype=bool) if cfg.repetition_penalty != 1.0 else None
        if seen is not None:
            for r, p in enumerate(self.prompts):
                seen[r, p] = True
        rng = np.random.default_rng(cfg.seed)

        t0 = time.perf_counter()
        s.reset(b, width + cfg.max_new_tokens)
        logits = s.prefill(ids, mask, pos, last_only=True)[:, -1, :]
        tok = sample_next(logits, rng, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                          repetition_penalty=cfg.repetition_penalty, seen=seen)
        self.prefill_ms = (time.perf_counter() - t0) * 1e3
        yield self._advance(tok, seen)
        # every step appends one attended column to each row: the mask is a growing view of one
        # buffer and the positions count up (a step costs few numpy calls: see ort_shared_kv)
        masks = np.ones((b, width + cfg.max_new_tokens), dtype=np.int64)
        masks[:, :width] = mask
        step_pos = mask.sum(axis=1, keepdims=True) - 1
        total = width
        t1 = time.perf_counter()
        try:
            while not all(self.finish):
                total += 1
                step_pos = step_pos + 1
                logits = s.step(tok[:, None], masks[:, :total], step_pos, last_only=True)[:, -1, :]
                tok = sample_next(logits, rng, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                                  repetition_penalty=cfg.repetition_penalty, seen=seen)
                self.steps += 1
                self.decode_s = time.perf_counter() - t1
                yield self._advance(tok, seen)
        finally:
            self.decode_s = time.perf_counter() - t1

    def _advance(self, tok: np.ndarray, seen) -> list[int | None]:
        out: list[int | None] = []
        for r in range(len(self.prompts)):
            if self.finish[r]:
                out.append(None)
                continue
            t = int(tok[r])
            if seen is not None:
                seen[r, t] = True
            self._check_stop(r, t)
            out.append(t)
        return out

    def results(self) -> list[GenerationResult]:
        rate = self.steps / self.decode_s if self.decode_s > 0 and self.steps else 0.0
        out = []
        for r, p in enumerate(self.prompts):
            text = self.texts[r]
            if text is None and self.tok is not None:
                text = self.tok.decode(self.generated[r])
            out.append(GenerationResult(
                token_ids=list(self.generated[r]), text=text, finish_reason=self.finish[r] or "length",
                prompt_tokens=len(p), prefill_ms=self.prefill_ms, decode_ms=self.decode_s * 1e3,
                decode_tokens_per_s=rate, backend=self.session.backend, batch=len(self.prompts),
                stop=self.stop_what[r],
            ))
        return out


def generate_batch(session: Session, prompts, config: GenerationConfig | None = None,
                   tokenizer: Tokenizer | None = None) -> list[GenerationResult]:
    """Generate for several prompts at once (left padding); one result per prompt."""
    run = _Run(session, list(prompts), config or GenerationConfig(), tokenizer)
    for _ in run:
        pass
    return run.results()


def generate(session: Session, prompt, config: GenerationConfig | None = None,
             tokenizer: Tokenizer | None = None) -> GenerationResult:
    """Generate for one prompt (token ids or text with a tokenizer)."""
    return generate_batch(session, [prompt], config, tokenizer)[0]


class stream:
    """Iterate :class:`StreamChunk` for one prompt as tokens are produced; ``.result`` when done.

    Text chunks concatenate to the final ``result.text`` (a stop string and what follows it
    are held back and never emitted).
    """

    def __init__(self, session: Session, prompt, config: GenerationConfig | None = None,
                 tokenizer: Tokenizer | None = None) -> None:
        self._run = _Run(session, [prompt], config or GenerationConfig(), tokenizer)
        self._tok = tokenizer
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[StreamChunk]:
        dec = StreamDecoder(self._tok) if self._tok is not None else None
        emitted = ""
        holdback = max((len(s) for s in self._run.cfg.stop_strings), default=0)
        for step in self._run:
            t = step[0]
            if t is None:
                break
            if dec is None:
                yield StreamChunk(t, "")
                continue
            dec.push(t)
            stopped_text = self._run.texts[0]
            visible = stopped_text if stopped_text is not None else dec.text
            if not self._run.finish[0] and holdback:
                # keep back what could still become a stop string
                visible = visible[: max(len(emitted), len(visible) - holdback + 1)]
            delta = visible[len(emitted):] if visible.startswith(emitted) else ""
            emitted += delta
            yield StreamChunk(t, delta)
        self.result = self._run.results()[0]
        if dec is not None and self.result.text is not None and self.result.text.startswith(emitted) \
                and len(self.result.text) > len(emitted):
            yield StreamChunk(None, self.result.text[len(emitted):])  # tail held back (partial char / holdback)


__all__ = ["GenerationConfig", "GenerationResult", "StreamChunk", "check_request", "generate",
           "generate_batch", "stream"]
