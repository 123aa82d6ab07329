"""The README's main command, end to end on the tiny size: `llama-trt demo`."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from llama_trt.cli import main


@pytest.mark.slow
def test_demo_runs_the_whole_pipeline(tmp_path):
    out = tmp_path / "demo"
    r = CliRunner().invoke(main, ["demo", "--out", str(out), "--size", "tiny", "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["passed"] is True
    rows = {row["artifact"]: row for row in summary["rows"]}
    for name in ("onnx-fp32", "onnx-fp16", "onnx-int8"):
        row = rows[name]
        assert row["verdict"] == "pass" and row["tokens_per_s"] > 0
        report = json.loads(open(row["report"]).read())
        assert report["passed"] is True
        assert (out / "reports" / f"{name}.png").stat().st_size > 1000
    # int8 weights are stored as int8 (the embedding table stays fp32 by default)
    sizes = [rows[n]["size_bytes"] for n in ("onnx-int8", "onnx-fp16", "onnx-fp32")]
    assert sizes == sorted(sizes) and sizes[0] < sizes[1] < sizes[2], sizes
    # text in, text out through the demo's own tokenizer
    assert summary["prompt"] == "Once upon a time" and len(summary["generated_text"]) > 0
    # the seeded model's text is meaningless, and the demo says so
    assert summary["model"].startswith("seeded random") and any("meaningless" in n for n in summary["notes"])
    assert "meaningless" in r.output
    from llama_trt.trt_engines.backend import available_backends

    engines = [name for name in rows if name.startswith("engine-")]
    if available_backends():
        assert len(engines) == 2
        for name in engines:
            assert (out / name.split(" ")[0] / "model.plan").stat().st_size > 0
    else:
        assert engines == [] and any("no TensorRT engines" in n for n in summary["notes"])


def test_demo_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("user data")
    r = CliRunner().invoke(main, ["demo", "--out", str(tmp_path), "--size", "tiny"])
    assert r.exit_code == 2 and "already exists; pass --force" in r.output
    r = CliRunner().invoke(main, ["demo", "--out", str(tmp_path), "--size", "tiny", "--force"])
    assert r.exit_code == 2 and "is not a llama-trt output" in r.output
    assert (tmp_path / "keep.txt").read_text() == "user data"


@pytest.mark.slow
def test_real_model_demo_answers_in_english(tmp_path, smollm2_hf):
    """The default demo path on SmolLM2-135M-Instruct (engines skipped to keep the suite short;
    the README's command builds them): fp16 and quantized exports pass the accuracy certificate,
    and the chat answer through our ONNX Runtime export names Paris, as transformers' does."""
    from llama_trt.demo import run_demo

    out = tmp_path / "demo"
    summary = run_demo(out, size="smollm2", engines=False, questions=("What is the capital of France?",))
    assert summary.passed, summary.rows
    rows = {r.artifact: r for r in summary.rows}
    assert set(rows) == {"onnx-fp16", "onnx-int4-awq"}
    assert rows["onnx-int4-awq"].size_bytes < 0.5 * rows["onnx-fp16"].size_bytes
    (answer,) = summary.chat
    assert "Paris" in answer.transformers  # the reference itself knows it
    assert "Paris" in answer.ours, answer
    assert (out / "summary.json").is_file()


def test_side_by_side_engine_builds_report_a_failed_child(tmp_path):
    """The demo builds its engines in child processes (`llama-trt build`); a child's error
    comes back as a BuildError naming the engine and carrying the child's own message."""
    import io

    from rich.console import Console

    from llama_trt.demo.stages import build_side_by_side
    from llama_trt.errors import BuildError
    from llama_trt.trt_engines.builder import BuildOptions

    jobs = {tmp_path / "engine-a": tmp_path / "no-export-a", tmp_path / "engine-b": tmp_path / "no-export-b"}
    with pytest.raises(BuildError, match=r"building engine-a failed: .*export folder not found"):
        build_side_by_side(jobs, BuildOptions(max_batch=4, force=True), Console(file=io.StringIO()), workers=2)
    assert not any(p.exists() for p in jobs)
