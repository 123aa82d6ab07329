"""The CLI rows of issue 16's table: --force never deletes what is not ours, bad input everywhere
is one `error:` line and exit 2 (disk full, corrupt model files, out-of-range options), SIGTERM
cleans up, and the polish items a new user hit."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from llama_trt.cli import main


def invoke(*args, cwd: Path | None = None):
    old = Path.cwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        return CliRunner().invoke(main, [str(a) for a in args])
    finally:
        os.chdir(old)


def one_error_line(r, needle: str = "") -> str:
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip() and not ln.lstrip().startswith(("⠋", "━"))]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.output, r.output
    assert needle in errors[0], errors[0]
    return errors[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny checkpoint and its export (made once)."""
    root = tmp_path_factory.mktemp("cli")
    r = invoke("create-tiny", root / "ckpt")
    assert r.exit_code == 0, r.output
    r = invoke("export", root / "ckpt", "-o", root / "export", "--no-ort-check")
    assert r.exit_code == 0, r.output
    return root


# ---- --force replaces only an earlier artifact of ours ------------------------------------------------
@pytest.mark.parametrize("target", ["input", "cwd", "parent", "foreign"])
@pytest.mark.parametrize("command", ["export", "build", "create-tiny"])
def test_force_never_deletes_what_is_not_ours(work, tmp_path, command, target):
    root = tmp_path / "root"
    shutil.copytree(work, root)
    source = {"export": root / "ckpt", "build": root / "export", "create-tiny": None}[command]
    foreign = root / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("do not delete")
    out = {"input": source or root / "ckpt", "cwd": Path("."), "parent": root, "foreign": foreign}[target]
    if command == "create-tiny" and target == "input":
        out = root / "ckpt"  # a checkpoint of ours: the one case --force may replace; checked below
    before = snapshot(root)
    args = {"export": ["export", source, "-o", out, "--force", "--no-ort-check"],
            "build": ["build", source, "-o", out, "--force"],
            "create-tiny": ["create-tiny", out, "--force"]}[command]
    r = invoke(*args, cwd=root)
    if command == "create-tiny" and target == "input":
        assert r.exit_code == 0, r.output  # replacing an earlier create-tiny output is what --force is for
        return
    one_error_line(r)
    assert snapshot(root) == before, "nothing may change"


def test_force_replaces_an_earlier_export(work, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(work / "export", out)
    (out / "stale.txt").write_text("old")
    r = invoke("export", work / "ckpt", "-o", out, "--force", "--no-ort-check")
    assert r.exit_code == 0, r.output
    assert not (out / "stale.txt").exists() and (out / "model.onnx").is_file()


def test_out_dir_that_is_a_file_says_so(work, tmp_path):
    f = tmp_path / "a-file"
    f.write_text("x")
    for args in (["export", work / "ckpt", "-o", f], ["export", work / "ckpt", "-o", f, "--force"],
                 ["create-tiny", f], ["build", work / "export", "-o", f]):
        line = one_error_line(invoke(*args), "is a file, not a folder")
        assert "already exists" not in line
    assert f.read_text() == "x"


def test_package_refuses_manifest_paths_outside_the_folder(work, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    eng = tmp_path / "a" / "b" / "engine"
    eng.mkdir(parents=True)
    export_m = json.loads((work / "export" / "manifest.json").read_text())
    (eng / "manifest.json").write_text(json.dumps({
        "kind": "engine", "config": export_m["config"], "engine_file": "model.plan",
        "tokenizer_files": ["../../../secret.txt"]}))
    (eng / "model.plan").write_bytes(b"plan")
    r = invoke("package", eng, "--triton", tmp_path / "repo")
    one_error_line(r, "not a file name inside the folder")
    assert not any(p.name == "secret.txt" for p in (tmp_path / "repo").rglob("*")) if (tmp_path / "repo").exists() \
        else True


def test_run_refuses_a_model_file_outside_the_folder(work, tmp_path):
    exp = tmp_path / "export"
    shutil.copytree(work / "export", exp)
    m = json.loads((exp / "manifest.json").read_text())
    m["model_file"] = str((work / "export" / "model.onnx").resolve())
    (exp / "manifest.json").write_text(json.dumps(m))
    one_error_line(invoke("run", exp, "--prompt-ids", "1"), "model_file")


# ---- disk full, corrupt files, SIGTERM -------------------------------------------------------------
def test_disk_full_during_export_is_one_line_and_leaves_nothing(work, tmp_path, monkeypatch):
    from llama_trt.exporter import core

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x" / "model.onnx"))

    monkeypatch.setattr(core, "save_onnx", full)
    out = tmp_path / "x"
    one_error_line(invoke("export", work / "ckpt", "-o", out, "--no-ort-check"), "disk is full")
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []


@pytest.mark.parametrize("command", ["run", "bench", "validate", "build", "serve"])
def test_corrupt_model_onnx_is_one_line(work, tmp_path, command):
    bad = tmp_path / "bad"
    shutil.copytree(work / "export", bad)
    (bad / "model.onnx").write_bytes((work / "export" / "model.onnx").read_bytes()[:1000])
    args = {"run": ["run", bad, "--prompt-ids", "1,2"], "bench": ["bench", bad, "--runs", "1", "--bandwidth-gib", "0"],
            "validate": ["validate", bad, "-c", work / "ckpt"], "build": ["build", bad, "-o", tmp_path / "eng"],
            "serve": ["serve", bad, "--port", "0"]}[command]
    r = invoke(*args)
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and r.output.count("error:") == 1, r.output
    assert not (tmp_path / "eng").exists()


@pytest.mark.slow
def test_sigterm_during_export_removes_the_temp_folder(work, tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, "-m", "llama_trt.cli", "export", str(work / "ckpt"), "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob(".out.export-*")):
        if proc.poll() is not None:
            pytest.fail(f"export ended before the temp folder showed: {proc.stdout.read()}")
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    text, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, text
    assert "error: terminated" in text
    assert list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())


# ---- numeric options, one error style ------------------------------------------------------------------
@pytest.mark.parametrize("args, option", [
    (["run", "EXPORT", "--prompt-ids", "1", "--threads", "100000"], "--threads"),
    (["run", "EXPORT", "--prompt-ids", "1", "--temperature", "nan"], "--temperature"),
    (["run", "EXPORT", "--prompt-ids", "1", "--temperature", "inf"], "--temperature"),
    (["run", "EXPORT", "--prompt-ids", "1", "--seed", "-1"], "--seed"),
    (["run", "EXPORT", "--prompt-ids", "1", "--top-p", "nan"], "--top-p"),
    (["serve", "EXPORT", "--port", "70000"], "--port"),
    (["serve", "EXPORT", "--max-body-bytes", "-1"], "--max-body-bytes"),
    (["serve", "EXPORT", "--request-timeout", "0"], "--request-timeout"),
    (["build", "EXPORT", "-o", "ENG", "--max-context", "0"], "--max-context"),
    (["bench", "EXPORT", "--batch", "0"], "--batch"),
    (["export", "CKPT", "-o", "ENG", "--dtype", "int8"], "--dtype"),
    (["run", "EXPORT", "--prompt-ids", "1", "--backend", "onnx"], "--backend"),
    (["frobnicate"], "No such command"),
])
def test_out_of_range_options_name_the_option(work, tmp_path, args, option):
    args = [work / "export" if a == "EXPORT" else work / "ckpt" if a == "CKPT" else tmp_path / "e" if a == "ENG"
            else a for a in args]
    t0 = time.perf_counter()
    line = one_error_line(invoke(*args), option)
    assert time.perf_counter() - t0 < 30 and not line.startswith("Error:")
    assert not (tmp_path / "e").exists()


def test_unexpected_errors_are_one_line_and_debug_shows_the_traceback(work, monkeypatch):
    from llama_trt.checkpoint import info as info_mod

    def bug(*a, **k):
        raise ZeroDivisionError("simulated bug")

    monkeypatch.setattr(info_mod, "checkpoint_info", bug)
    r = invoke("info", work / "ckpt")
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "--debug" in r.output and "Traceback" not in r.output
    r = invoke("--debug", "info", work / "ckpt")
    assert isinstance(r.exception, ZeroDivisionError)


# ---- polish ----------------------------------------------------------------------------------------------
def test_int8_hint_names_a_command_that_exists(work, tmp_path):
    from llama_trt.errors import ExportError
    from llama_trt.exporter import export

    with pytest.raises(ExportError) as e:
        export(work / "ckpt", tmp_path / "o", dtype="int8")
    assert "llama-trt quantize" not in str(e.value) and "--quantize" in str(e.value)


def test_run_engine_with_onnxruntime_says_an_engine(work, tmp_path):
    eng = tmp_path / "eng"
    eng.mkdir()
    m = json.loads((work / "export" / "manifest.json").read_text())
    (eng / "manifest.json").write_text(json.dumps({"kind": "engine", "config": m["config"]}))
    (eng / "model.plan").write_bytes(b"x")
    line = one_error_line(invoke("run", eng, "--prompt-ids", "1", "--backend", "onnxruntime"))
    assert "is an engine" in line and "a engine" not in line
    line = one_error_line(invoke("validate", eng, "-c", work / "ckpt"))
    assert "--backend tensorrt" in line and "llama-trt export" not in line


def test_bench_footer_keeps_square_brackets(capsys):
    from llama_trt.runtime.bench import BenchResult, render_bench

    r = BenchResult(backend="onnxruntime", artifact="x", batch=1, prompt_len=4, new_tokens=4, runs=1,
                    ttft_ms_median=1.0, decode_tokens_per_s_median=1.0, ttft_ms=[1.0], decode_tokens_per_s=[1.0],
                    peak_rss_mib=1.0, weight_bytes_per_token=1, kv_bytes_per_token=1, bandwidth_gb_s=None,
                    bandwidth_gb_s_median=None, limit_tokens_per_s=None, fraction_of_limit=None,
                    session={"providers": ["CPUExecutionProvider"]})
    render_bench(r)
    assert "['CPUExecutionProvider']" in capsys.readouterr().out


def test_every_option_has_help_and_backends_are_choices():
    import click

    for name, cmd in main.commands.items():
        for p in cmd.params:
            if isinstance(p, click.Option):
                assert p.help, f"{name} {p.opts} has no help text"
                if p.name in ("backend", "dtype", "quantize"):
                    assert isinstance(p.type, click.Choice), f"{name} --{p.name} is free text"
