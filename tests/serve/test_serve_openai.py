"""The official openai client against the real server: same text as `llama-trt run`."""

from __future__ import annotations

import concurrent.futures as cf
import threading

import pytest

MODEL = "tiny"
PROMPT = "once upon a time there lived a little girl"


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    with openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def test_completion_equals_run(client, run_cli):
    ref = run_cli("--prompt", PROMPT, "--max-new-tokens", "12")
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    assert r.choices[0].text == ref["text"] and ref["text"]
    assert r.choices[0].finish_reason == ("length" if ref["finish_reason"] == "length" else "stop")
    assert r.usage.prompt_tokens == ref["prompt_tokens"] == len(ref["prompt_ids"])
    assert r.usage.completion_tokens == len(ref["token_ids"])
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completion_stream_equals_run(client, run_cli):
    ref = run_cli("--prompt", PROMPT, "--max-new-tokens", "12")
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == ref["text"]
    assert sum(1 for c in chunks if c.choices and c.choices[0].text) > 1  # really streamed
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12


def test_chat_equals_run(client, run_cli):
    ref = run_cli("--prompt", "hello world", "--chat", "--max-new-tokens", "10")
    msgs = [{"role": "user", "content": "hello world"}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref["text"]
    assert r.usage.prompt_tokens == len(ref["prompt_ids"]) and r.usage.completion_tokens == len(ref["token_ids"])
    stream = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref["text"]
    assert chunks[-1].choices[0].finish_reason == "length"


def test_seeded_sampling_and_extras_equal_run(client, run_cli):
    ref = run_cli("--prompt", PROMPT, "--max-new-tokens", "10", "--temperature", "0.8", "--top-p", "0.9",
                  "--top-k", "40", "--repetition-penalty", "1.3", "--seed", "123")
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0.8, top_p=0.9, seed=123,
              extra_body={"top_k": 40, "repetition_penalty": 1.3})
    a = client.completions.create(**kw).choices[0].text
    b = client.completions.create(**kw).choices[0].text
    assert a == b == ref["text"]


def test_stop_string_equals_run(client, run_cli):
    full = run_cli("--prompt", PROMPT, "--max-new-tokens", "12")["text"]
    words = full.split()
    stop = words[3]  # a word in the middle of the greedy text
    ref = run_cli("--prompt", PROMPT, "--max-new-tokens", "12", "--stop", stop)
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop, "zzz"])
    assert r.choices[0].text == ref["text"] and stop not in r.choices[0].text
    assert r.choices[0].finish_reason == "stop"
    chunks = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stop=stop,
                                       stream=True)
    assert "".join(c.choices[0].text for c in chunks) == ref["text"]


def test_models_and_health(client, server):
    import httpx

    assert [m.id for m in client.models.list().data] == [MODEL]
    h = httpx.get(server.base_url + "/health").json()
    assert h["status"] == "ok" and h["model"] == MODEL


def test_concurrent_requests_are_batched_and_equal_solo(client, engine, run_cli):
    """Requests that overlap share decode steps (continuous batching) and still get their solo tokens."""
    prompts = ["the cat sat on the mat", "hello world", "a big red dog ran to the house and", "once upon a time"]
    refs = [run_cli("--prompt", p, "--max-new-tokens", "16")["text"] for p in prompts]
    before = engine.stats.max_active
    engine.stats.max_active = 0
    barrier = threading.Barrier(len(prompts))

    def one(p):
        barrier.wait()
        return client.completions.create(model=MODEL, prompt=p, max_tokens=16, temperature=0).choices[0].text

    with cf.ThreadPoolExecutor(len(prompts)) as ex:
        got = list(ex.map(one, prompts))
    assert got == refs
    assert engine.stats.max_active >= 2, engine.stats  # at least two sequences decoded in one step
    engine.stats.max_active = max(before, engine.stats.max_active)


def test_metrics(server, client):
    import httpx

    client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0)
    text = httpx.get(server.base_url + "/metrics").text
    for name in ("llama_trt_http_requests_total{endpoint=\"/v1/completions\",status=\"200\"}",
                 "llama_trt_generated_tokens_total", "llama_trt_prompt_tokens_total",
                 "llama_trt_time_to_first_token_seconds_bucket", "llama_trt_time_per_output_token_seconds_bucket",
                 "llama_trt_queue_depth", "llama_trt_scheduler_steps_total"):
        assert name in text, name


def test_static_batching_fallback_matches_solo(tiny_export, run_cli):
    """continuous=False (what TensorRT engines get): groups admitted when the batch drains, same tokens."""
    from llama_trt.runtime.generate import GenerationConfig
    from llama_trt.runtime.sessions import open_session
    from llama_trt.runtime.tokenizer import load_tokenizer
    from llama_trt.serve.engine import Engine, FinishEvent, GenRequest

    tok = load_tokenizer(tiny_export)
    prompts = ["the cat sat on the mat", "hello world", "a big red dog ran to the house and"]
    refs = [run_cli("--prompt", p, "--max-new-tokens", "9")["token_ids"] for p in prompts]
    eng = Engine(open_session(tiny_export, "onnxruntime"), tok, model_name=MODEL, max_batch=2, continuous=False)
    eng.start()
    try:
        reqs = [eng.submit(GenRequest(tok.encode(p), GenerationConfig(max_new_tokens=9))) for p in prompts]
        got = []
        for r in reqs:
            while not isinstance(ev := r.events.get(timeout=30), FinishEvent):
                pass
            got.append(list(ev.token_ids))
    finally:
        eng.close()
    assert got == refs
    assert eng.stats.joins == 0 and eng.stats.max_active <= 2
