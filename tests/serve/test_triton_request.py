"""The generate model's input tensors -> prompt ids + GenerationConfig, with serve's limits."""

from __future__ import annotations

import numpy as np
import pytest

from llama_trt.serve.engine import InvalidRequestError
from llama_trt.serve.triton_request import parse_generate_inputs


def s(text: str) -> np.ndarray:
    return np.array([text.encode()], dtype=np.object_)


def test_a_full_request(engine):
    got = parse_generate_inputs({
        "text_input": s("the cat sat"), "max_tokens": np.array([7], np.int32), "temperature": np.array([0.5], np.float32),
        "top_p": np.array([0.9], np.float32), "top_k": np.array([5], np.int32), "seed": np.array([3], np.uint64),
        "stop": np.array([b"mat", b""], dtype=np.object_), "stop_token_ids": np.array([9], np.int64),
        "repetition_penalty": np.array([1.1], np.float32), "stream": np.array([True])}, engine, 64)
    assert got.prompt_ids == engine.tokenizer.encode("the cat sat") and got.stream
    p = got.params
    assert (p.max_new_tokens, p.top_k, p.seed, p.stop_strings, p.stop_token_ids) == (7, 5, 3, ("mat",), (9,))
    assert p.temperature == pytest.approx(0.5) and p.top_p == pytest.approx(0.9)
    assert p.repetition_penalty == pytest.approx(1.1)


def test_defaults_ids_and_chat(engine):
    got = parse_generate_inputs({"input_ids": np.array([1, 5, 6], np.int64)}, engine, 16)
    assert got.prompt_ids == [1, 5, 6] and not got.stream
    assert (got.params.max_new_tokens, got.params.temperature, got.params.top_p) == (16, 0.0, 1.0)
    tok = engine.tokenizer
    chat = parse_generate_inputs({"text_input": s("hello"), "chat": np.array([True])}, engine, 16)
    want = tok.encode(tok.apply_chat_template([{"role": "user", "content": "hello"}]), add_bos=False)
    assert chat.prompt_ids == want and chat.prompt_ids != tok.encode("hello")


@pytest.mark.parametrize("inputs, param", [
    ({}, "text_input"),
    ({"text_input": s("a"), "input_ids": np.array([1])}, "text_input"),
    ({"input_ids": np.array([1, 100000])}, "input_ids"),
    ({"text_input": s("a"), "max_tokens": np.array([0], np.int32)}, "max_tokens"),
    ({"text_input": s("a"), "max_tokens": np.array([100000], np.int32)}, "max_tokens"),
    ({"text_input": s("a"), "temperature": np.array([2.5], np.float32)}, "temperature"),
    ({"text_input": s("a"), "temperature": np.array([np.nan], np.float32)}, "temperature"),
    ({"text_input": s("a"), "top_p": np.array([0.0], np.float32)}, "top_p"),
    ({"text_input": s("a"), "top_k": np.array([-1], np.int32)}, "top_k"),
    ({"text_input": s("a"), "repetition_penalty": np.array([0.0], np.float32)}, "repetition_penalty"),
    ({"text_input": s("a"), "stop": np.array([b"a", b"b", b"c", b"d", b"e"], dtype=np.object_)}, "stop"),
    ({"text_input": s("a"), "max_tokens": np.array([1, 2], np.int32)}, "max_tokens"),
    ({"text_input": np.array([b"\xff\xfe"], dtype=np.object_)}, "text_input"),
])
def test_refusals_name_the_input(engine, inputs, param):
    with pytest.raises(InvalidRequestError) as e:
        parse_generate_inputs(inputs, engine, 16)
    assert e.value.param == param and e.value.status == 400
