"""llama-trt validate: passes on correct exports, fails on broken ones, exit codes, report round-trip."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from llama_trt.cli import main
from llama_trt.validate import ValidationReport, load_report, validate

from .conftest import TAMPERED_LAYER_TINY


def invoke(*args):
    return CliRunner().invoke(main, ["validate", *map(str, args)], catch_exceptions=False)


# ---- correct exports pass ---------------------------------------------------------------
def test_tiny_fp32_passes_with_report_plot_layerwise_and_round_trip(tiny_fp32, tiny_ckpt, tmp_path):
    report_path, plot_path = tmp_path / "out" / "report.json", tmp_path / "out" / "plot.png"
    r = invoke(tiny_fp32, "--checkpoint", tiny_ckpt, "--steps", 8, "--report", report_path,
               "--plot", plot_path, "--layerwise")
    assert r.exit_code == 0, r.output
    assert "validation passed" in r.output and "first failing layer = none" in r.output
    assert plot_path.stat().st_size > 10_000 and plot_path.read_bytes()[:4] == b"\x89PNG"

    # The report JSON round-trips through our loader and compares equal.
    rep = load_report(report_path)
    assert isinstance(rep, ValidationReport) and rep.passed and rep.failures == ()
    assert ValidationReport.from_json(rep.to_json()) == rep
    assert json.loads(rep.to_json()) == json.loads(report_path.read_text())
    # What the report records: inputs, tolerances, metrics, verdict, versions, manifest.
    prefill = rep.feeds[0]
    assert prefill.name == "prefill" and prefill.shapes["input_ids"] == (2, 12)
    assert prefill.attention_mask[1][:4] == (0, 0, 0, 0)  # left padding in row 1
    decode = rep.feeds[1]
    assert decode.shapes["input_ids"] == (2, 1) and decode.shapes["past_key_values.0.key"][2] == 12
    assert rep.tolerances["logits"] == (1e-3, 1e-3)
    assert {m.name for m in rep.metrics} >= {"top1", "kl", "cosine", "greedy", "ppl_reference", "ppl_candidate"}
    assert rep.metric("kl").value < 1e-8 and rep.metric("top1").value == 1.0
    assert rep.greedy.agreement == 1.0 and rep.greedy.first_divergence is None and len(rep.greedy.candidate_tokens) == 8
    assert abs(rep.perplexity.relative_difference) < 1e-5
    assert {"torch", "onnx", "onnxruntime", "polygraphy"} <= set(rep.versions)
    assert rep.manifest["dtype"] == "fp32" and rep.manifest["config"]["num_layers"] == 2
    assert len(rep.layerwise.points) == 2 * 2 * 2 + 2 and rep.layerwise.first_failing_layer is None
    # Polygraphy's RunResults saved beside the report and readable by Polygraphy.
    from polygraphy.comparator import RunResults

    rr = RunResults.load(rep.run_results)
    names = [name for name, _ in rr]
    assert names == ["torch-fp32", "onnxruntime"]
    assert len(rr["onnxruntime"]) == len(rep.feeds)
    assert rr["torch-fp32"][0]["logits"].shape == (2, 12, 256)


def test_tiny_fp16_passes(tiny_fp16, tiny_ckpt):
    rep = validate(tiny_fp16, tiny_ckpt, steps=8)
    assert rep.passed, rep.failures
    assert rep.precision == "fp16" and rep.tolerances["logits"] == (0.5, 0.5)
    assert rep.metric("kl").value < 1e-4


@pytest.mark.parametrize("which", ["stories_fp32", "stories_fp16"])
def test_stories260k_passes(which, request, stories260k):
    artifact = request.getfixturevalue(which)
    r = invoke(artifact, "--checkpoint", stories260k, "--steps", 16)
    assert r.exit_code == 0, r.output
    assert "PASSED" in r.output


def test_tol_override_reaches_polygraphy(tiny_fp16, tiny_ckpt):
    """A glob override on present.* makes only those outputs fail: the check can fail."""
    rep = validate(tiny_fp16, tiny_ckpt, steps=2, tolerances={"present.*": (1e-7, 1e-7)})
    assert not rep.passed
    failed = {o.output for o in rep.outputs if not o.passed}
    assert failed and all(n.startswith("present.") for n in failed)
    assert all(m.passed is not False for m in rep.metrics)


# ---- broken exports fail ----------------------------------------------------------------
def test_tampered_weight_fails_and_layerwise_names_the_layer(tiny_tampered, tiny_ckpt, tmp_path):
    r = invoke(tiny_tampered, "--checkpoint", tiny_ckpt, "--steps", 8, "--layerwise",
               "--report", tmp_path / "report.json")
    assert r.exit_code == 1, r.output
    assert "validation FAILED" in r.output
    assert "output logits" in r.output and "metric kl" in r.output
    assert f"first failing layer: {TAMPERED_LAYER_TINY} (layers.{TAMPERED_LAYER_TINY}.output)" in r.output
    rep = load_report(tmp_path / "report.json")
    assert not rep.passed and rep.layerwise.first_failing_layer == TAMPERED_LAYER_TINY
    # everything before the tampered MLP still matches
    before = [p for p in rep.layerwise.points if p.point == f"layers.{TAMPERED_LAYER_TINY}.post_attention_layernorm"]
    assert before and all(p.passed for p in rep.layerwise.points[: before[0].index + 1])


def test_rope_attribute_flip_fails(tiny_rope_flipped, tiny_ckpt):
    r = invoke(tiny_rope_flipped, "--checkpoint", tiny_ckpt, "--steps", 4)
    assert r.exit_code == 1, r.output
    assert "output present.0.key" in r.output  # keys are rotated: wrong from layer 0 on
    assert "metric kl" in r.output and "metric top1" in r.output


# ---- usage errors: exit 2, one clear line ---------------------------------------------------
def test_checkpoint_artifact_mismatch_exit_2(tiny_fp32, stories260k):
    r = invoke(tiny_fp32, "--checkpoint", stories260k)
    assert r.exit_code == 2, r.output
    assert "does not match the artifact" in r.output and "num_layers" in r.output
    assert "Traceback" not in r.output


def test_missing_artifact_exit_2(tmp_path, tiny_ckpt):
    r = invoke(tmp_path / "nope", "--checkpoint", tiny_ckpt)
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: ") and "not found" in r.output


def test_tensorrt_backend_on_cpu_fails_fast(tiny_fp32, tiny_ckpt):
    from llama_trt.validate.runners import _nvidia_gpu_count

    if _nvidia_gpu_count() > 0:
        pytest.skip("an NVIDIA GPU is present")
    r = invoke(tiny_fp32, "--checkpoint", tiny_ckpt, "--backend", "tensorrt")
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and "ImportError" not in r.output
    assert "NVIDIA GPU" in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_tensorrt_not_installed_message(monkeypatch):
    import importlib.util

    from llama_trt.errors import BackendUnavailableError
    from llama_trt.validate import runners

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("tensorrt") else real(name, *a))
    with pytest.raises(BackendUnavailableError) as e:
        runners.require_tensorrt()
    msg = str(e.value)
    assert msg.startswith("TensorRT is not installed") and "pip install 'llama-trt[rtx]'" in msg
    assert "JetPack" in msg and "NVIDIA GPU" in msg
