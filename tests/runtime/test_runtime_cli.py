"""`llama-trt run` / `bench`: JSON keys, text prompts with a tokenizer, and one-line errors."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from llama_trt.cli import main


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_run_json_keys(stories_export):
    r = invoke("run", stories_export, "--prompt-ids", "1,400,401", "--max-new-tokens", 5, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert {"token_ids", "text", "backend", "prefill_ms", "decode_tokens_per_s", "finish_reason"} <= set(out)
    assert len(out["token_ids"]) == 5 and out["text"] is None and out["backend"] == "onnxruntime"


def test_run_text_prompt_stream_and_chat(stories_export, word_tokenizer_json):
    base = ["run", stories_export, "--tokenizer", word_tokenizer_json, "--prompt", "w461 w13", "--max-new-tokens", 8,
            "--ignore-eos"]
    r = invoke(*base, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["prompt_ids"] == [1, 461, 13] and out["text"].split() == [f"w{i}" for i in out["token_ids"]]
    r = invoke(*base, "--stream", "--no-echo")
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == out["text"]
    for extra in ([], ["--stream"]):  # the prompt, then the continuation (the tokenizer's space between)
        r = invoke(*base, *extra)
        assert r.exit_code == 0, r.output
        assert r.stdout.strip() == "w461 w13 " + out["text"]
    r = invoke(*base, "--stream", "--json")
    lines = [json.loads(line) for line in r.stdout.strip().splitlines()]
    assert "".join(c["text"] for c in lines[:-1]) == out["text"] and lines[-1]["token_ids"] == out["token_ids"]
    r = invoke(*base, "--chat", "--json")
    assert r.exit_code == 0, r.output


def test_bench_json_keys(stories_export):
    r = invoke("bench", stories_export, "--prompt-len", 8, "--new-tokens", 4, "--runs", 2, "--batch", 2,
               "--bandwidth-gib", 0.0625, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    for key in ("backend", "ttft_ms_median", "decode_tokens_per_s_median", "peak_rss_mib", "bandwidth_gb_s",
                "limit_tokens_per_s", "fraction_of_limit", "weight_bytes_per_token", "kv_bytes_per_token", "session"):
        assert key in out, key
    assert out["batch"] == 2 and len(out["ttft_ms"]) == 2 and out["bandwidth_gb_s"] > 0
    assert 0 < out["fraction_of_limit"] and out["session"]["graph_optimization_level"] == "ORT_ENABLE_ALL"


def test_bench_table(stories_export):
    r = invoke("bench", stories_export, "--prompt-len", 4, "--new-tokens", 3, "--runs", 1, "--bandwidth-gib", 0)
    assert r.exit_code == 0, r.output
    assert "TTFT" in r.output and "decode" in r.output


@pytest.fixture(scope="module")
def fake_engine(tmp_path_factory, stories_export):
    d = tmp_path_factory.mktemp("engine")
    manifest = json.loads((stories_export / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps({"kind": "engine", "config": manifest["config"]}))
    return d


def error_cases(stories_export, stories260k, fake_engine, word_tokenizer_json, tmp_path):
    long_ids = ",".join(["5"] * 500)
    return [
        (["run", stories_export, "--prompt-ids", long_ids, "--max-new-tokens", 64],
         "prompt of 500 tokens + max_new_tokens 64 exceeds the context of 512"),
        (["run", stories_export, "--prompt-ids", ""], "the prompt is empty"),
        (["run", stories_export, "--tokenizer", word_tokenizer_json, "--prompt", ""], "the prompt is empty"),
        (["run", stories_export, "--prompt-ids", "1", "--backend", "vulkan"], "'vulkan' is not one of 'auto', 'tensorrt'"),
        (["run", stories_export, "--prompt-ids", "1", "--backend", "tensorrt"], "no TensorRT engine"),
        (["run", fake_engine, "--prompt-ids", "1"], "no TensorRT engine"),
        (["run", tmp_path / "nope", "--prompt-ids", "1"], "artifact not found"),
        (["run", stories260k, "--prompt-ids", "1", "--backend", "onnxruntime"], "not an ONNX export"),
        (["run", stories_export, "--prompt", "hello"], "has no tokenizer"),
        (["run", stories_export, "--prompt-ids", "1,9999"], "outside the vocabulary"),
        (["run", stories_export, "--prompt-ids", "1", "--stop", "x"], "stop strings need a tokenizer"),
        (["run", stories_export, "--prompt-ids", "1", "--top-p", "0"], "'--top-p': 0.0 is not in the range 0.0<x<=1.0"),
        (["bench", tmp_path / "nope"], "artifact not found"),
    ]


def test_errors_are_one_line(stories_export, stories260k, fake_engine, word_tokenizer_json, tmp_path):
    for args, message in error_cases(stories_export, stories260k, fake_engine, word_tokenizer_json, tmp_path):
        r = invoke(*args)
        assert r.exit_code != 0, (args, r.output)
        assert "Traceback" not in r.output and r.exception is None or isinstance(r.exception, SystemExit)
        lines = r.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, r.output)


def test_engine_folder_without_tensorrt(fake_engine, tmp_path, monkeypatch):
    """No TensorRT flavour importable: one line naming what to install (simulated absence)."""
    import shutil

    from llama_trt.trt_engines import backend as trt_backend

    monkeypatch.setattr(trt_backend, "_import_flavour", lambda name: (None, f"{name}: not installed"))
    engine = tmp_path / "engine"
    shutil.copytree(fake_engine, engine)
    (engine / "engine.plan").write_bytes(b"not a real plan")
    for backend in ("auto", "tensorrt"):
        r = invoke("run", engine, "--prompt-ids", "1", "--backend", backend)
        assert r.exit_code == 2, r.output
        assert r.output.startswith("error: neither TensorRT nor TensorRT-RTX is importable"), r.output
        assert "pip install tensorrt-rtx-cu13-libs" in r.output and "Traceback" not in r.output
