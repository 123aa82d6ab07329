"""A real Triton Inference Server (the tritonserver of the nvidia-pytriton wheel) serving the
repository `llama-trt package` writes for the tiny ONNX export: HTTP generate, generate_stream
and gRPC streaming give `llama-trt run`'s greedy tokens; 100 requests at 16 concurrent all
succeed and /metrics counts them; bad requests get errors, not a crash; stopping by PID
leaves no process behind."""

from __future__ import annotations

import json
import os
import queue
import re
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import llama_trt
from llama_trt.errors import BackendUnavailableError
from llama_trt.serve.server import free_port
from llama_trt.serve.triton import package_triton
from llama_trt.serve.tritonserver import (
    TritonPorts, TritonServer, check_stub_numpy, find_tritonserver, launch_spec, processes_in_group,
)

pytestmark = pytest.mark.slow

PROMPTS = ("once upon a time", "the cat sat on the mat", "hello world", "she loved the little red bird")


def require_tritonserver():
    """The wheel's tritonserver and numpy<2 (`pip install -e .[dev]` installs both). Under CI a
    missing piece fails the test; elsewhere it skips, naming the fix."""
    try:
        install = find_tritonserver()
        check_stub_numpy(install)
    except BackendUnavailableError as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(e))
    return install


def start_triton(artifact: Path, root: Path, name: str, **package_options) -> TritonServer:
    install = require_tritonserver()
    res = package_triton(artifact, root / "repo", model_name=name, **package_options)
    ports = TritonPorts(free_port(), free_port(), free_port())
    spec = launch_spec(res.repository, [res.generate_model], ports=ports, install=install,
                       backend_dir=root / "backends")
    env = dict(os.environ)  # the stub imports the llama_trt under test
    src = str(Path(llama_trt.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    server = TritonServer(spec, log_file=root / "tritonserver.log", env=env).start()
    try:
        server.wait_ready(300)
    except BaseException:
        server.stop(10)
        raise
    return server


@pytest.fixture(scope="module")
def triton(tiny_export, tmp_path_factory):
    server = start_triton(tiny_export, tmp_path_factory.mktemp("triton"), "tiny", threads=1, max_queue=256)
    yield server
    server.stop()


def post(url: str, body, timeout: float = 120) -> tuple[int, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def generate(server: TritonServer, body: dict, model: str = "tiny_generate") -> dict:
    status, raw = post(f"{server.launch.http_url}/v2/models/{model}/generate", body)
    assert status == 200, raw
    return json.loads(raw)


def metric(server: TritonServer, name: str, model: str = "tiny_generate") -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.launch.ports.metrics}/metrics", timeout=10) as r:
        text = r.read().decode()
    m = re.search(rf'^{name}{{model="{model}",version="1"}} (\S+)$', text, re.M)
    assert m, f"{name} missing from /metrics"
    return float(m.group(1))


def as_list(v) -> list:
    return v if isinstance(v, list) else [v]


@pytest.fixture(scope="module")
def refs(run_cli):
    """`llama-trt run` (greedy, ONNX Runtime): the reference for every prompt."""
    return {p: run_cli("--prompt", p, "--max-new-tokens", "12") for p in PROMPTS}


def test_http_generate_and_generate_stream_match_run(triton, refs, run_cli):
    for prompt, ref in refs.items():
        out = generate(triton, {"text_input": prompt, "max_tokens": 12})
        assert out["text_output"] == ref["text"] and as_list(out["output_ids"]) == ref["token_ids"]
        assert out["finish_reason"] == ref["finish_reason"] and out["prompt_tokens"] == len(ref["prompt_ids"])
        assert out["completion_tokens"] == len(ref["token_ids"])
    prompt, ref = PROMPTS[0], refs[PROMPTS[0]]
    status, raw = post(f"{triton.launch.http_url}/v2/models/tiny_generate/generate_stream",
                       {"text_input": prompt, "max_tokens": 12, "stream": True})
    assert status == 200
    events = [json.loads(line[5:]) for line in raw.decode().splitlines() if line.startswith("data:")]
    assert len(events) > 2 and all("error" not in e for e in events)
    assert "".join(e["text_output"] for e in events) == ref["text"]
    assert sum((as_list(e["output_ids"]) for e in events), []) == ref["token_ids"]
    assert events[-1]["finish_reason"] == "length" and not any(e["finish_reason"] for e in events[:-1])
    # token ids in, seeded sampling: same as `run --prompt-ids --seed`
    ids = ",".join(map(str, ref["prompt_ids"]))
    sampled = generate(triton, {"input_ids": ref["prompt_ids"], "max_tokens": 8, "temperature": 0.9, "top_k": 20,
                                "top_p": 0.95, "seed": 7})
    want = run_cli("--prompt-ids", ids, "--max-new-tokens", "8", "--temperature", "0.9", "--top-k", "20",
                   "--top-p", "0.95", "--seed", "7")
    assert as_list(sampled["output_ids"]) == want["token_ids"] and sampled["text_output"] == want["text"]


def test_grpc_streaming_matches_run(triton, refs):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url=f"127.0.0.1:{triton.launch.ports.grpc}")
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        for prompt, ref in refs.items():
            inputs = [grpcclient.InferInput("text_input", [1], "BYTES"),
                      grpcclient.InferInput("max_tokens", [1], "INT32"), grpcclient.InferInput("stream", [1], "BOOL")]
            inputs[0].set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_))
            inputs[1].set_data_from_numpy(np.array([12], dtype=np.int32))
            inputs[2].set_data_from_numpy(np.array([True]))
            client.async_stream_infer("tiny_generate", inputs, request_id=prompt)
            text, ids, chunks = "", [], 0
            while True:
                result, error = results.get(timeout=120)
                assert error is None, error
                text += result.as_numpy("text_output")[0].decode()
                ids += result.as_numpy("output_ids").tolist()
                chunks += 1
                if result.as_numpy("finish_reason")[0]:
                    break
            assert text == ref["text"] and ids == ref["token_ids"] and chunks > 2
    finally:
        client.stop_stream()
        client.close()


def test_100_requests_16_concurrent_and_metrics_count_them(triton, refs):
    before = metric(triton, "nv_inference_request_success")

    def one(i: int):
        prompt = PROMPTS[i % len(PROMPTS)]
        out = generate(triton, {"text_input": prompt, "max_tokens": 12})
        return out["text_output"] == refs[prompt]["text"] and as_list(out["output_ids"]) == refs[prompt]["token_ids"]

    queued_before = metric(triton, "nv_inference_queue_duration_us")
    with ThreadPoolExecutor(16) as pool:
        ok = list(pool.map(one, range(100)))
    assert sum(ok) == 100  # 0 failures, and batched greedy text equals each request alone
    assert metric(triton, "nv_inference_request_success") - before == 100
    # 16 clients, 8 batch slots: the model takes a request only when a slot is free, so the rest
    # wait in Triton's queue and its queue metrics (the HPA's signal) see the load (measured here:
    # 6.6 s of queue time over the 100 requests, against 0.6 s when execute returned at once;
    # test_serve_triton.py checks the mechanism deterministically)
    assert metric(triton, "nv_inference_queue_duration_us") > queued_before
    assert metric(triton, "nv_inference_pending_request_count") == 0  # the HPA metric, back at rest


BAD = [  # body, model, expected status
    ({"max_tokens": 4}, "tiny_generate", 400),                                   # no prompt
    ({"text_input": "a", "input_ids": [1, 2]}, "tiny_generate", 400),            # both
    ({"text_input": "the cat", "max_tokens": 100000}, "tiny_generate", 400),     # past the context
    ({"text_input": "the cat", "top_p": 0}, "tiny_generate", 400),
    ({"text_input": "the cat", "temperature": 5}, "tiny_generate", 400),
    ({"text_input": "the cat", "top_k": -1}, "tiny_generate", 400),
    ({"input_ids": [1, 99999]}, "tiny_generate", 400),                           # outside the vocabulary
    ({"text_input": "the cat", "stop": ["a", "b", "c", "d", "e"]}, "tiny_generate", 400),
    ({"text_input": "the cat"}, "no_such_model", 404),
]


def test_bad_requests_get_errors_and_the_server_keeps_serving(triton, refs):
    for body, model, want in BAD:
        status, raw = post(f"{triton.launch.http_url}/v2/models/{model}/generate", body)
        assert status == want, (body, status, raw)
        assert json.loads(raw)["error"]
    # bodies Triton's own HTTP front end cannot parse: an error status (Triton 2.51 says 500), no crash
    for raw_body in (b"garbage", b'{"text_input": "a", "temperature": "hot"}'):
        status, raw = post(f"{triton.launch.http_url}/v2/models/tiny_generate/generate", raw_body)
        assert status >= 400 and b"error" in raw
    # stream true on /generate: many responses where one is expected; Triton 2.51 has sent its
    # status line with the first one, so the refusal is a 200 whose body is the error
    status, raw = post(f"{triton.launch.http_url}/v2/models/tiny_generate/generate",
                       {"text_input": "the cat", "max_tokens": 4, "stream": True})
    assert "generate_stream" in json.loads(raw)["error"].replace(" ", "_") or "stream" in json.loads(raw)["error"]
    assert triton.ready() and triton.proc.poll() is None
    out = generate(triton, {"text_input": PROMPTS[0], "max_tokens": 12})
    assert out["text_output"] == refs[PROMPTS[0]]["text"]


def test_stop_by_pid_leaves_no_process(triton):
    pid = triton.pid
    assert len(processes_in_group(pid)) >= 2  # tritonserver + the python backend stub
    code = triton.stop(timeout=60)
    assert code == 0
    assert processes_in_group(pid) == []
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(d.name))
    return out


def test_cli_triton_serve_runs_until_sigterm(tiny_export, tmp_path):
    """`llama-trt triton-serve` (a real subprocess): ready, answers, and SIGTERM to the CLI stops
    tritonserver and its stub."""
    import signal
    import subprocess
    import sys
    import time

    require_tritonserver()
    res = package_triton(tiny_export, tmp_path / "repo", model_name="tiny", threads=1)
    http = free_port()
    env = dict(os.environ)
    src = str(Path(llama_trt.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    cli = subprocess.Popen([sys.executable, "-m", "llama_trt.cli", "triton-serve", str(res.repository), "--model",
                            res.generate_model, "--http-port", str(http), "--grpc-port", str(free_port()),
                            "--metrics-port", str(free_port()), "--backend-dir", str(tmp_path / "backends")],
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert cli.poll() is None, cli.stderr.read().decode()[-2000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "triton-serve was not ready"
            time.sleep(0.5)
        status, raw = post(f"http://127.0.0.1:{http}/v2/models/tiny_generate/generate",
                           {"text_input": PROMPTS[0], "max_tokens": 3})
        assert status == 200 and json.loads(raw)["completion_tokens"] == 3
        (server_pid,) = _children(cli.pid)
        cli.send_signal(signal.SIGTERM)
        cli.wait(90)
        assert processes_in_group(server_pid) == []  # tritonserver and its stub are gone
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait(10)


# ---------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct (real tokenizer and chat template) through the same real server
CHAT_PROMPTS = ("What is the capital of France?", "Write a haiku about the sea.")


@pytest.fixture(scope="module")
def smollm2_export(smollm2_fp32_export):
    return smollm2_fp32_export


@pytest.fixture(scope="module")
def smol_triton(smollm2_export, tmp_path_factory):
    require_tritonserver()
    server = start_triton(smollm2_export, tmp_path_factory.mktemp("smol-triton"), "smollm2", max_batch=4)
    yield server
    server.stop()


def _run_chat(export: Path, prompt: str, max_tokens: int) -> dict:
    from click.testing import CliRunner

    from llama_trt.cli import main

    res = CliRunner().invoke(main, ["run", str(export), "--backend", "onnxruntime", "--chat", "--prompt", prompt,
                                    "--max-new-tokens", str(max_tokens), "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_smollm2_chat_over_http_and_grpc_matches_run(smol_triton, smollm2_export):
    import tritonclient.grpc as grpcclient

    refs = {p: _run_chat(smollm2_export, p, 24) for p in CHAT_PROMPTS}
    for prompt, ref in refs.items():
        out = generate(smol_triton, {"text_input": prompt, "chat": True, "max_tokens": 24}, "smollm2_generate")
        assert out["text_output"] == ref["text"] and as_list(out["output_ids"]) == ref["token_ids"]
        assert out["prompt_tokens"] == len(ref["prompt_ids"]) and out["finish_reason"] == ref["finish_reason"]
    client = grpcclient.InferenceServerClient(url=f"127.0.0.1:{smol_triton.launch.ports.grpc}")
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        prompt, ref = CHAT_PROMPTS[1], refs[CHAT_PROMPTS[1]]
        inputs = [grpcclient.InferInput("text_input", [1], "BYTES"), grpcclient.InferInput("chat", [1], "BOOL"),
                  grpcclient.InferInput("max_tokens", [1], "INT32"), grpcclient.InferInput("stream", [1], "BOOL")]
        inputs[0].set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_))
        inputs[1].set_data_from_numpy(np.array([True]))
        inputs[2].set_data_from_numpy(np.array([24], dtype=np.int32))
        inputs[3].set_data_from_numpy(np.array([True]))
        client.async_stream_infer("smollm2_generate", inputs)
        text, ids = "", []
        while True:
            result, error = results.get(timeout=300)
            assert error is None, error
            text += result.as_numpy("text_output")[0].decode()
            ids += result.as_numpy("output_ids").tolist()
            if result.as_numpy("finish_reason")[0]:
                break
        assert text == ref["text"] and ids == ref["token_ids"]
    finally:
        client.stop_stream()
        client.close()
    before = metric(smol_triton, "nv_inference_request_success", "smollm2_generate")
    with ThreadPoolExecutor(4) as pool:  # concurrent chat requests: all answered
        outs = list(pool.map(lambda i: generate(smol_triton, {"text_input": CHAT_PROMPTS[i % 2], "chat": True,
                                                              "max_tokens": 8}, "smollm2_generate"), range(8)))
    assert all(o["text_output"] and o["completion_tokens"] >= 1 for o in outs)
    assert metric(smol_triton, "nv_inference_request_success", "smollm2_generate") - before == 8
    pid = smol_triton.pid
    assert smol_triton.stop() == 0 and processes_in_group(pid) == []
