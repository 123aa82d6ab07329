"""OpenAI request models (pydantic) and OpenAI-shaped error bodies.

Field types are strict (no "0.5" -> 0.5 coercion): a wrong type is a 400
``invalid_request_error`` naming the field, as OpenAI answers, not FastAPI's 422.
Unknown fields are accepted and ignored (clients send newer fields), except the ones
we cannot honour, which are refused explicitly (``n > 1``, ``logprobs``, ``logit_bias``,
non-zero ``presence_penalty`` / ``frequency_penalty``, ``echo``, ``best_of > 1``, tools).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, Strict

SInt = Annotated[int, Strict()]
SFloat = Annotated[float, Strict()]  # strict float still accepts JSON integers
SStr = Annotated[str, Strict()]
SBool = Annotated[bool, Strict()]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: SBool = False


class _Sampling(BaseModel):
    """Fields shared by completions and chat completions (OpenAI names + two extras)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: SStr
    max_tokens: SInt | None = Field(default=None, ge=1)
    temperature: SFloat = Field(default=1.0, ge=0.0, le=2.0)
    top_p: SFloat = Field(default=1.0, gt=0.0, le=1.0)
    n: SInt = Field(default=1, ge=1)
    stream: SBool = False
    stream_options: StreamOptions | None = None
    stop: SStr | list[SStr] | None = None
    seed: SInt | None = Field(default=None, ge=0, le=2**64 - 1)  # numpy's seed range; -1 used to hang the server
    presence_penalty: SFloat = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: SFloat = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, SFloat] | None = None
    user: SStr | None = None
    # extras (vLLM names; with the official client pass them through ``extra_body``)
    top_k: SInt = Field(default=0, ge=0)  # > vocab size: off, as HF
    repetition_penalty: SFloat = Field(default=1.0, gt=0.0)
    ignore_eos: SBool = False
    stop_token_ids: list[SInt] | None = None


class CompletionRequest(_Sampling):
    prompt: Union[SStr, list[SStr], list[SInt], list[list[SInt]]]
    echo: SBool = False
    logprobs: SInt | None = None
    best_of: SInt | None = None
    suffix: SStr | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: SStr
    text: SStr | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: SStr | list[ContentPart] | None = None
    name: SStr | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: SBool = False
    top_logprobs: SInt | None = None
    max_completion_tokens: SInt | None = Field(default=None, ge=1)
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "constrained-str", "constrained-int",
              "constrained-float", "json-or-python"}


def describe_validation_error(errors: list[dict]) -> tuple[str, str | None]:
    """(message, param) for the first pydantic error, e.g. ("temperature: Input should be ...", "temperature")."""
    if not errors:
        return "invalid request body", None
    e = errors[0]
    loc = [str(p) for p in e.get("loc", ()) if p not in ("body",)]
    # union members add their type name to loc; keep the field path only
    path = []
    for p in loc:
        if "[" in p or p.startswith("function-") or p in _TYPE_TAGS:  # union member tags, not fields
            continue
        path.append(p)
    param = ".".join(path) or None
    msg = e.get("msg", "invalid value")
    if e.get("type") == "missing":
        msg = "required field is missing"
    fields = {tuple(str(x) for x in err.get("loc", ()))[:1] for err in errors}
    if len(errors) > 1 and len(fields) == 1:  # the members of a union each failed
        msg, more = f"invalid type or value ({msg.lower()} / ...; see the OpenAI API reference)", ""
    else:
        more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return (f"{param}: {msg}{more}" if param else f"{msg}{more}"), param


__all__ = ["ChatCompletionRequest", "ChatMessage", "CompletionRequest", "ContentPart", "StreamOptions",
           "describe_validation_error", "error_body"]
