"""Every bad input gets its exact status code in OpenAI's error shape; 503 + Retry-After; disconnects free slots."""

from __future__ import annotations

import threading

import httpx
import pytest
from serve_helpers import GatedSession, ServerThread, wait_for

MODEL = "tiny"
OK = {"model": MODEL, "prompt": "hello world", "max_tokens": 2, "temperature": 0}


def _err(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    return body["error"]


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=30) as c:
        yield c


def test_ok_baseline(http):
    assert http.post("/v1/completions", json=OK).status_code == 200


def test_malformed_json_400(http):
    e = _err(http.post("/v1/completions", content=b'{"model": "tiny", "prompt": ', headers={"content-type": "application/json"}), 400)
    assert e["type"] == "invalid_request_error" and e["code"] == "invalid_json"
    _err(http.post("/v1/chat/completions", content=b"[1, 2]", headers={"content-type": "application/json"}), 400)
    _err(http.post("/v1/completions", content=b"", headers={"content-type": "application/json"}), 400)


@pytest.mark.parametrize("patch,param", [
    ({"max_tokens": "5"}, "max_tokens"),
    ({"temperature": "hot"}, "temperature"),
    ({"prompt": 5}, "prompt"),
    ({"stream": "yes"}, "stream"),
    ({"stop": 3}, "stop"),
    ({"temperature": 3.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"model": None}, "model"),
])
def test_wrong_types_400(http, patch, param):
    e = _err(http.post("/v1/completions", json={**OK, **patch}), 400)  # OpenAI answers 400, never 422
    assert e["param"] == param and e["type"] == "invalid_request_error"


def test_missing_fields_400(http):
    assert _err(http.post("/v1/completions", json={"model": MODEL}), 400)["param"] == "prompt"
    assert _err(http.post("/v1/chat/completions", json={"model": MODEL, "messages": []}), 400)["param"] == "messages"
    bad_role = {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}
    assert _err(http.post("/v1/chat/completions", json=bad_role), 400)["param"].startswith("messages")


def test_unknown_model_404(http):
    e = _err(http.post("/v1/completions", json={**OK, "model": "gpt-17"}), 404)
    assert e["code"] == "model_not_found" and e["param"] == "model"
    _err(http.post("/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]}), 404)


def test_prompt_longer_than_context_400(http, engine):
    long_ids = [5] * (engine.max_context + 3)
    e = _err(http.post("/v1/completions", json={**OK, "prompt": long_ids}), 400)
    assert e["code"] == "context_length_exceeded"
    words = " ".join(["cat"] * engine.max_context)
    _err(http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": words}]}), 400)


def test_max_tokens_over_limit_400(http, engine):
    e = _err(http.post("/v1/completions", json={**OK, "max_tokens": engine.max_context}), 400)
    assert e["param"] == "max_tokens" and e["code"] == "context_length_exceeded"


def test_token_ids_outside_vocab_400(http, engine):
    _err(http.post("/v1/completions", json={**OK, "prompt": [1, engine.vocab_size + 5]}), 400)


def test_unsupported_parameters_400(http):
    for patch in ({"n": 2}, {"logprobs": 2}, {"frequency_penalty": 0.5}, {"logit_bias": {"5": 1.0}}):
        assert _err(http.post("/v1/completions", json={**OK, **patch}), 400)["code"] == "unsupported_parameter"


def test_body_too_large_413(http):
    big = {**OK, "prompt": "cat " * 40000}  # > 64 KiB (the fixture's limit)
    e = _err(http.post("/v1/completions", json=big), 413)
    assert e["code"] == "request_too_large"

    def chunks():  # no Content-Length: counted while reading
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(100):
            yield b"cat " * 256
        yield b'"}'

    _err(http.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"}), 413)


def test_not_found_route_is_openai_shaped(http):
    _err(http.get("/v1/nothing"), 404)


# ---------------------------------------------------------------------------------------
def test_auth_401_and_health_open(engine, tiny_export):
    from fastapi.testclient import TestClient

    from llama_trt.serve.app import create_app
    from llama_trt.serve.settings import ServeSettings

    app = create_app(engine, ServeSettings(api_key="s3cret"))
    with TestClient(app) as c:  # in-process
        assert c.get("/health").status_code == 200
        e = _err(c.post("/v1/completions", json=OK), 401)
        assert e["code"] == "missing_api_key"
        e = _err(c.post("/v1/completions", json=OK, headers={"Authorization": "Bearer wrong"}), 401)
        assert e["code"] == "invalid_api_key"
        _err(c.get("/v1/models", headers={"Authorization": "Basic s3cret"}), 401)
        _err(c.get("/metrics"), 401)
        assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.post("/v1/completions", json=OK, headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_default_bind_is_loopback():
    from llama_trt.serve.settings import ServeSettings

    assert ServeSettings().host == "127.0.0.1"


# ---------------------------------------------------------------------------------------
@pytest.fixture()
def gated(tiny_export):
    """A server with one slot, a queue of one and a session we can hold (gate) or slow down."""
    from llama_trt.runtime.sessions import open_session
    from llama_trt.runtime.tokenizer import load_tokenizer
    from llama_trt.serve.app import create_app
    from llama_trt.serve.engine import Engine
    from llama_trt.serve.settings import ServeSettings

    sess = GatedSession(open_session(tiny_export, "onnxruntime"))
    eng = Engine(sess, load_tokenizer(tiny_export), model_name=MODEL, max_batch=1, max_queue=1)
    with ServerThread(create_app(eng, ServeSettings(retry_after_s=2))) as srv:
        yield srv, eng, sess
        sess.gate.set()
    eng.close()


def test_full_queue_503_with_retry_after(gated):
    srv, eng, sess = gated
    sess.gate.clear()  # hold the first step
    results = {}

    def post(key):
        results[key] = httpx.post(srv.base_url + "/v1/completions", json=OK, timeout=30)

    t1 = threading.Thread(target=post, args=("first",))
    t1.start()
    assert wait_for(lambda: eng.active_count == 1)  # in the slot, blocked in its step
    t2 = threading.Thread(target=post, args=("second",))
    t2.start()
    assert wait_for(lambda: eng.queue_depth == 1)  # waiting in the queue
    r = httpx.post(srv.base_url + "/v1/completions", json=OK, timeout=30)
    e = _err(r, 503)
    assert r.headers["retry-after"] == "2" and e["code"] == "queue_full"
    sess.gate.set()
    t1.join(30)
    t2.join(30)
    assert results["first"].status_code == 200 and results["second"].status_code == 200


def test_disconnect_frees_the_slot(gated):
    srv, eng, sess = gated
    sess.delay = 0.05  # ~20 tokens/s: the request would take ~10 s
    cancelled = eng.stats.cancelled
    body = {**OK, "max_tokens": 200, "stream": True}
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", srv.base_url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert any(line.startswith("data: {") for line in lines)  # got a token chunk
        # leaving the block closes the connection mid-stream
    assert wait_for(lambda: eng.active_count == 0 and eng.stats.cancelled == cancelled + 1, timeout=10)
    # non-streaming: the client times out and goes away
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(srv.base_url + "/v1/completions", json={**OK, "max_tokens": 200}, timeout=0.5)
    assert wait_for(lambda: eng.active_count == 0 and eng.stats.cancelled == cancelled + 2, timeout=10)
    sess.delay = 0.0
    r = httpx.post(srv.base_url + "/v1/completions", json=OK, timeout=30)  # the slot is usable again
    assert r.status_code == 200
