"""`llama-trt export` bad input: one clear line, exit code 2, nothing left behind."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from llama_trt.cli import main


def run(*args):
    return CliRunner().invoke(main, ["export", *map(str, args)])


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if ".export-" in p.name or ".old-" in p.name)


def error_line(res) -> str:
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1, res.output
    assert lines[0].startswith("error: ")
    return lines[0]


def test_missing_checkpoint(tmp_path):
    res = run(tmp_path / "nope", "-o", tmp_path / "out")
    assert res.exit_code == 2
    assert "checkpoint not found" in error_line(res)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_out_dir_under_a_file(tmp_path, checkpoints):
    (tmp_path / "afile").write_text("x")
    res = run(checkpoints("gqa"), "-o", tmp_path / "afile" / "out")
    assert res.exit_code == 2
    assert "is a file" in error_line(res)
    assert (tmp_path / "afile").read_text() == "x" and leftovers(tmp_path) == []


@pytest.mark.parametrize("dtype", ["int4", "int8", "bf16"])
def test_unknown_dtype(tmp_path, checkpoints, dtype):
    res = run(checkpoints("gqa"), "-o", tmp_path / "out", "--dtype", dtype)
    assert res.exit_code == 2
    line = error_line(res)
    assert dtype in line and "fp32" in line and "fp16" in line
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_bad_opset(tmp_path, checkpoints):
    res = run(checkpoints("gqa"), "-o", tmp_path / "out", "--opset", "11")
    assert res.exit_code == 2 and "opset" in error_line(res)


def test_existing_out_dir_needs_force(tmp_path, checkpoints):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = run(checkpoints("gqa"), "-o", out)
    assert res.exit_code == 2
    assert "--force" in error_line(res)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and leftovers(tmp_path) == []


def test_failure_mid_export_leaves_nothing(tmp_path, checkpoints, monkeypatch):
    """A failure after the temporary folder exists: OUT_DIR is untouched (even with --force)."""
    from llama_trt.errors import ExportError
    from llama_trt.exporter import core

    def boom(model, opset):
        raise ExportError("torch.onnx export failed: simulated")

    monkeypatch.setattr(core, "trace_to_onnx", boom)
    res = run(checkpoints("gqa"), "-o", tmp_path / "new")
    assert res.exit_code == 2 and "simulated" in error_line(res)
    assert not (tmp_path / "new").exists() and leftovers(tmp_path) == []

    old = tmp_path / "old"
    old.mkdir()
    (old / "keep.txt").write_text("mine")
    (old / "manifest.json").write_text('{"kind": "llama_trt.onnx_export"}')  # an earlier export: --force may replace
    res = run(checkpoints("gqa"), "-o", old, "--force")
    assert res.exit_code == 2
    assert (old / "keep.txt").read_text() == "mine" and leftovers(tmp_path) == []


def test_load_manifest_rejects_non_exports(tmp_path):
    from llama_trt.errors import ExportError
    from llama_trt.exporter import load_manifest

    with pytest.raises(ExportError, match="not found"):
        load_manifest(tmp_path / "missing")
    with pytest.raises(ExportError, match="no manifest.json"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"kind": "something else"}')
    with pytest.raises(ExportError, match="not an ONNX export manifest"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ExportError, match="unreadable manifest"):
        load_manifest(tmp_path)


def test_manifest_round_trip_and_missing_model(exported, tmp_path):
    import shutil

    from llama_trt.errors import ExportError
    from llama_trt.exporter import ExportManifest, load_manifest

    exp = exported("gqa", "fp32")
    m = load_manifest(exp.out_dir)
    assert ExportManifest.from_json(m.to_json()) == m
    copy = tmp_path / "copy"
    shutil.copytree(exp.out_dir, copy)
    (copy / "model.onnx").unlink()
    with pytest.raises(ExportError, match="model.onnx.*missing"):
        load_manifest(copy)
