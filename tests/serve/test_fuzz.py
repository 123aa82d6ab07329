"""Property-based fuzzing of the HTTP API (issue 16, item 10) against the real server on loopback.

Whatever the body -- wrong types, out-of-range numbers, any Unicode including lone surrogates,
deep nesting, big strings, raw bytes -- the answer is a 200 or a 4xx in OpenAI's error shape,
never a 5xx, never a hang (a socket timeout fails the example), a stream always ends with
``[DONE]``, and the next request on the same keep-alive connection succeeds (unless the server
itself said ``Connection: close``, then a new connection must).

The server under test is the session's tiny export (``server`` fixture: 64 KiB body limit).
"""

from __future__ import annotations

import http.client as http_client
import json

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

MODEL = "tiny"
OK = {"model": MODEL, "prompt": "hello world", "max_tokens": 2, "temperature": 0}
TIMEOUT_S = 30  # far above any honest answer from the tiny model; a hang fails here
# no "explain" phase: it re-parses this file's AST, which trips over deep-nesting examples on a failure
PHASES = [Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink]
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                phases=PHASES)

# ---- strategies ------------------------------------------------------------------------------------
# any code point, lone surrogates (category Cs, which hypothesis leaves out unless asked) included:
# json.dumps escapes them as \udXXX
any_char = st.characters() | st.characters(categories=["Cs"])
text = st.text(any_char, max_size=40) | st.sampled_from(["", "hello world", "\ud800", "a\udfffb", "\x00", "cat " * 50])
numbers = (st.integers(-(2**70), 2**70) | st.sampled_from([0, 1, -1, 2**63 - 1, 2**63, 2**64 - 1, 2**64])
           | st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from([0.0, 1e-300, 2.0, 2.0001, 1e308]))
scalars = st.none() | st.booleans() | numbers | text
json_values = st.recursive(scalars, lambda kids: st.lists(kids, max_size=4)
                           | st.dictionaries(st.text(any_char, max_size=8), kids, max_size=4), max_leaves=12)
small_ints = st.integers(-3, 12)
token_ids = st.lists(st.integers(-5, 300) | st.sampled_from([2**63, 2**70]), min_size=0, max_size=6)

# plausible values per field (so that deeper code is reached), mixed with anything at all
FIELDS = {
    "model": st.just(MODEL) | text,
    "max_tokens": small_ints | st.sampled_from([None, 255, 256, 2**70]),
    "temperature": st.floats(-1, 3, allow_nan=False) | st.sampled_from([0, 2, None]),
    "top_p": st.floats(-0.5, 1.5, allow_nan=False),
    "top_k": small_ints | st.sampled_from([2**70, 10**6]),
    "seed": numbers,
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | json_values,
    "stop": text | st.lists(text, max_size=6),
    "stop_token_ids": token_ids,
    "repetition_penalty": st.floats(-1, 1e6, allow_nan=False),
    "ignore_eos": st.booleans(),
    "n": small_ints,
    "user": text,
    "logit_bias": st.dictionaries(text, numbers, max_size=2),
    "presence_penalty": numbers,
}
COMPLETION_FIELDS = {
    **FIELDS,
    "prompt": text | st.lists(text, max_size=4) | token_ids | st.lists(token_ids, max_size=3),
    "echo": st.booleans(), "best_of": small_ints, "suffix": text, "logprobs": small_ints,
}
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "developer", "tool", "wizard"]) | text,
     "content": text | st.none() | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": text}), max_size=2)
     | json_values})
CHAT_FIELDS = {**FIELDS, "messages": st.lists(message, max_size=4) | json_values,
               "max_completion_tokens": small_ints, "tools": json_values, "response_format": json_values}


def bodies(fields: dict, base: dict) -> st.SearchStrategy:
    """A valid base request with some fields replaced by fuzz, some by arbitrary JSON, some dropped,
    plus unknown fields."""
    def build(choices, anything, drop, extra):
        body = {**base, **choices, **anything}
        for k in drop:
            body.pop(k, None)
        body.update(extra)
        return body

    keys = sorted(fields)
    return st.builds(
        build,
        st.fixed_dictionaries({}, optional={k: fields[k] for k in keys}),
        st.dictionaries(st.sampled_from(keys), json_values, max_size=2),
        st.lists(st.sampled_from(keys), max_size=1),
        st.dictionaries(st.text(max_size=6).map(lambda k: f"x_{k}"), json_values, max_size=2),
    )


# ---- the property ---------------------------------------------------------------------------------------
def _send(conn, path: str, body: bytes) -> tuple[int, bytes, dict]:
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()  # a streamed answer is read to its end here; the socket timeout bounds it
    return resp.status, data, {k.lower(): v for k, v in resp.getheaders()}


def check_answer(port: int, path: str, body: bytes) -> None:
    conn = http_client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT_S)
    try:
        status, data, headers = _send(conn, path, body)
        assert status == 200 or 400 <= status < 500, (status, data[:500])
        if status != 200:
            err = json.loads(data)["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"], err
        elif headers.get("content-type", "").startswith("text/event-stream"):
            events = [ln for ln in data.decode().splitlines() if ln.startswith("data:")]
            assert events and events[-1] == "data: [DONE]", events[-3:]
            assert all("error" not in json.loads(e[5:]) for e in events[:-1]), events[-3:]
        else:
            assert json.loads(data)["choices"], data[:500]
        if headers.get("connection", "").lower() == "close":
            conn.close()
            conn = http_client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT_S)
        status2, data2, _ = _send(conn, "/v1/completions", json.dumps(OK).encode())
        assert status2 == 200, (status2, data2[:500])
    finally:
        conn.close()


def _encode(body) -> bytes:
    return json.dumps(body).encode()  # ensure_ascii: lone surrogates travel as \udXXX escapes


@FUZZ
@given(body=bodies(COMPLETION_FIELDS, OK))
@example(body={**OK, "seed": -1})
@example(body={**OK, "prompt": "ab\ud800cd"})
@example(body={**OK, "prompt": [[2**63]]})
@example(body={**OK, "stop_token_ids": [2**70], "stream": True})
@example(body={**OK, "suffix": {"\ud8d3": "\ud800"}})  # the error quoted a lone surrogate: 500
def test_completions_fuzz(server, body):
    check_answer(server.port, "/v1/completions", _encode(body))


@FUZZ
@given(body=bodies(CHAT_FIELDS, {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}))
@example(body={"model": MODEL, "messages": [{"role": "user", "content": "x\ud83d"}]})
def test_chat_fuzz(server, body):
    check_answer(server.port, "/v1/chat/completions", _encode(body))


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, phases=PHASES)
@given(raw=st.binary(max_size=200)
       | st.integers(1, 40_000).map(lambda n: b'{"model": "tiny", "prompt": ' + b"[" * n + b"]" * n + b"}")
       | st.integers(60_000, 70_000).map(lambda n: _encode({**OK, "prompt": "a" * n}))
       | json_values.map(_encode),
       path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
@example(raw=b"\xff\xfe{", path="/v1/completions")
@example(raw=b'{"model": "tiny", "prompt": "hi"}' + b" " * 70_000, path="/v1/completions")
def test_raw_body_fuzz(server, raw, path):
    check_answer(server.port, path, raw)


@pytest.fixture(scope="module", autouse=True)
def _server_still_healthy(server):
    yield
    conn = http_client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT_S)
    try:
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200
    finally:
        conn.close()


def _nested(value, depth: int):
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("body", [{**OK, "x\udc80": "\ud800"}, {**OK, "suffix": {"\ud8d3": "\ud800"}},
                                  {**OK, "user": {"\ud8d3": _nested(1, 40)}}],
                         ids=["extra-field", "nested-key", "deep-under-key"])
def test_an_error_quoting_a_lone_surrogate_is_a_4xx(server, body):
    """Found by the fuzz: the error message/param quoted the client's lone surrogate and the
    JSON response could not be encoded as UTF-8, so the client got a 500."""
    conn = http_client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT_S)
    try:
        status, data, _ = _send(conn, "/v1/completions", _encode(body))
        assert 400 <= status < 500, (status, data)
        data.decode("utf-8")  # valid UTF-8 on the wire
    finally:
        conn.close()
    check_answer(server.port, "/v1/completions", _encode(body))
