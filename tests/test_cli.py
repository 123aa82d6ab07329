"""The CLI's foundation commands: create-tiny and info."""

from __future__ import annotations

import json

from click.testing import CliRunner

from llama_trt.cli import main


def test_create_tiny_then_info_json(tmp_path):
    runner = CliRunner()
    out = tmp_path / "tiny"
    r = runner.invoke(main, ["create-tiny", str(out), "--seed", "3"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["info", str(out), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    cfg = info["config"]
    assert info["format"] == "hf"
    assert cfg["num_heads"] == 4 and cfg["num_kv_heads"] == 2  # GQA
    # parameter count from first principles
    h, i, v, L, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_layers"], cfg["head_dim"]
    per_layer = 2 * h * 4 * d + 2 * h * 2 * d + 3 * h * i + 2 * h
    assert info["parameters"] == 2 * v * h + L * per_layer + h
    n = info["parameters"]
    assert info["bytes"] == {"fp32": 4 * n, "fp16": 2 * n, "int8": n, "int4": n // 2}


def test_info_table(stories260k):
    r = CliRunner().invoke(main, ["info", str(stories260k)])
    assert r.exit_code == 0, r.output
    assert "llama2c" in r.output and "num_kv_heads" in r.output


def test_info_missing_checkpoint_is_one_line_exit_2(tmp_path):
    r = CliRunner().invoke(main, ["info", str(tmp_path / "missing")])
    assert r.exit_code == 2
    assert r.output.strip().startswith("error: checkpoint not found")
    assert "Traceback" not in r.output


def test_create_tiny_refuses_non_empty(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("keep me")
    r = CliRunner().invoke(main, ["create-tiny", str(tmp_path / "x")])
    assert r.exit_code == 2 and "already exists; pass --force" in r.output
    assert (tmp_path / "x" / "f").read_text() == "keep me"
    r = CliRunner().invoke(main, ["create-tiny", str(tmp_path / "x"), "--force"])  # not ours: --force refuses too
    assert r.exit_code == 2 and "not a llama-trt output" in r.output
    assert (tmp_path / "x" / "f").read_text() == "keep me"
