"""One Triton generate request (the python model's input tensors) -> prompt ids + GenerationConfig.

The same rules as ``llama-trt serve``'s request models (``protocol.py``): temperature in
[0, 2], top_p in (0, 1], top_k >= 0, repetition_penalty > 0, max_tokens >= 1 and within the
context, at most ``MAX_STOP_SEQUENCES`` stop strings, token ids inside the vocabulary. Every
refusal is an :class:`InvalidRequestError` naming the input, which the model answers with
Triton's INVALID_ARG error (HTTP 400). Needs numpy only (no Triton import), so it is tested
without a server.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import LlamaTrtError
from ..runtime.generate import GenerationConfig
from .engine import Engine, InvalidRequestError, request_config

MAX_STOP_SEQUENCES = 4  # as ServeSettings.max_stop_sequences


@dataclass(frozen=True)
class GenerateInputs:
    prompt_ids: list[int]
    params: GenerationConfig
    stream: bool


def _values(arrays: dict, name: str) -> np.ndarray | None:
    a = arrays.get(name)
    if a is None:
        return None
    a = np.asarray(a).reshape(-1)
    return a if a.size else None


def _scalar(arrays: dict, name: str, kind: type):
    a = _values(arrays, name)
    if a is None:
        return None
    if a.size != 1:
        raise InvalidRequestError(f"{name}: expected one value, got {a.size}", name)
    v = a[0]
    if kind is str:
        try:
            return v.decode("utf-8") if isinstance(v, bytes) else str(v)
        except UnicodeDecodeError:
            raise InvalidRequestError(f"{name}: not valid UTF-8 text", name) from None
    if kind is float:
        v = float(v)
        if not math.isfinite(v):
            raise InvalidRequestError(f"{name} must be a finite number, got {v}", name)
        return v
    return kind(v.item() if hasattr(v, "item") else v)


def _strings(arrays: dict, name: str) -> tuple[str, ...]:
    a = _values(arrays, name)
    if a is None:
        return ()
    try:
        return tuple(s for s in (v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in a) if s)
    except UnicodeDecodeError:
        raise InvalidRequestError(f"{name}: not valid UTF-8 text", name) from None


def _in_range(name: str, v, ok: bool, what: str):
    if not ok:
        raise InvalidRequestError(f"{name} must be {what}, got {v}", name)
    return v


def prompt_ids(arrays: dict, engine: Engine) -> list[int]:
    """Token ids of the prompt: ``input_ids`` as given, or ``text_input`` tokenized (``chat``:
    rendered as one user message with the chat template, as ``llama-trt run --chat``)."""
    text = _scalar(arrays, "text_input", str)
    ids = _values(arrays, "input_ids")
    if (text is None) == (ids is None):
        raise InvalidRequestError("give exactly one of text_input (a prompt) or input_ids (token ids)", "text_input")
    if ids is not None:
        return [int(i) for i in ids]
    tok = engine.tokenizer
    if tok is None:
        raise InvalidRequestError("this model has no tokenizer: send the prompt as input_ids", "text_input")
    if _scalar(arrays, "chat", bool):
        try:
            return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]), add_bos=False)
        except LlamaTrtError as e:
            raise InvalidRequestError(str(e), "chat") from None
    return tok.encode(text)


def parse_generate_inputs(arrays: dict, engine: Engine, default_max_tokens: int) -> GenerateInputs:
    """``arrays``: input name -> numpy array (absent inputs missing or None)."""
    ids = prompt_ids(arrays, engine)
    max_tokens = _scalar(arrays, "max_tokens", int)
    if max_tokens is not None:
        _in_range("max_tokens", max_tokens, max_tokens >= 1, ">= 1")
        max_tokens = engine.check(ids, max_tokens, param="input_ids")
    else:
        max_tokens = min(default_max_tokens, engine.check(ids, None, param="input_ids"))
    temperature = _scalar(arrays, "temperature", float)
    top_p = _scalar(arrays, "top_p", float)
    top_k = _scalar(arrays, "top_k", int)
    penalty = _scalar(arrays, "repetition_penalty", float)
    stops = _strings(arrays, "stop")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise InvalidRequestError(f"stop: at most {MAX_STOP_SEQUENCES} stop sequences", "stop")
    if stops and engine.tokenizer is None:
        raise InvalidRequestError("stop strings need a tokenizer and this model has none; use stop_token_ids", "stop")
    sampling = dict(
        temperature=_in_range("temperature", temperature, 0.0 <= temperature <= 2.0, "in [0, 2]")
        if temperature is not None else 0.0,
        top_p=_in_range("top_p", top_p, 0.0 < top_p <= 1.0, "in (0, 1]") if top_p is not None else 1.0,
        top_k=_in_range("top_k", top_k, top_k >= 0, ">= 0 (0 = off)") if top_k is not None else 0,
        repetition_penalty=_in_range("repetition_penalty", penalty, penalty > 0, "> 0 (1 = off)")
        if penalty is not None else 1.0,
        seed=_scalar(arrays, "seed", int), stop_strings=stops,
        stop_token_ids=tuple(int(i) for i in (_values(arrays, "stop_token_ids") if
                                              _values(arrays, "stop_token_ids") is not None else ())),
        ignore_eos=bool(_scalar(arrays, "ignore_eos", bool) or False))
    try:
        params = request_config(max_tokens, **sampling)
    except LlamaTrtError as e:  # GenerationConfig's own checks
        raise InvalidRequestError(str(e)) from None
    return GenerateInputs(ids, params, bool(_scalar(arrays, "stream", bool) or False))


__all__ = ["GenerateInputs", "MAX_STOP_SEQUENCES", "parse_generate_inputs", "prompt_ids"]
