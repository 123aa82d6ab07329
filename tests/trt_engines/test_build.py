"""`llama-trt build` on TensorRT-RTX (CPU-only AOT) or full TensorRT."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest
from click.testing import CliRunner

from llama_trt.cli import main
from llama_trt.trt_engines import EngineManifest, load_engine_manifest

pytestmark = pytest.mark.tensorrt


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _one_line_error(result, *needles):
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, result.output
    for n in needles:
        assert n in lines[0], lines[0]
    assert "Traceback" not in result.output


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_cli_build_writes_engine_and_manifest(exports, trt_backend, rtx_targets, tmp_path, dtype):
    out = tmp_path / "engine"
    args = ["build", exports("tiny", dtype), "-o", out, "--max-batch", 2, "--max-seq", 16, "--max-context", 64,
            "--timing-cache", tmp_path / "tc.bin"]
    for t in rtx_targets:
        args += ["--target", t]
    r = _cli(*args)
    assert r.exit_code == 0, r.output
    assert "wrote" in r.output
    plan = out / "model.plan"
    assert plan.is_file() and plan.stat().st_size > 0
    m = load_engine_manifest(out)
    raw = json.loads((out / "manifest.json").read_text())
    assert raw["kind"] == "engine" and EngineManifest.from_json(m.to_json()) == m
    assert m.backend == trt_backend.name and m.backend_version == trt_backend.version
    assert m.precision == dtype
    assert m.engine_bytes == plan.stat().st_size
    assert 0 < m.weight_bytes < m.engine_bytes and m.network_weight_bytes[dtype] > 0
    weights_line = next(ln for ln in r.output.splitlines() if ln.startswith("weights: "))
    assert f"{m.weight_bytes / 1e6:.1f} MB in the engine" in weights_line
    assert [p.name for p in m.profiles] == ["prefill", "decode"]
    assert (m.profiles[0].min, m.profiles[0].max) == ((1, 1, 0), (2, 16, 0))
    assert (m.profiles[1].min, m.profiles[1].max) == ((1, 1, 0), (2, 1, 63))
    assert m.limits == {"max_batch": 2, "max_seq": 16, "max_context": 64} and raw["max_context"] == 64
    assert m.source["manifest"]["dtype"] == dtype and m.config["num_layers"] == 2
    cfg = m.llama_config
    if trt_backend.is_rtx:
        assert m.targets == ("89", "120")
        assert m.header["version"] == ".".join(trt_backend.version.split(".")[:3])
        assert m.header["compute_capabilities"] == ["89", "120"]
        assert m.timing_cache["used"] is False and "no-op" in m.timing_cache["note"]
        assert "no-op" in r.output
        routes = {x.op: x for x in m.op_routing}
        assert routes["llama_trt.RotaryEmbedding"].route == "native"
        assert routes["llama_trt.RotaryEmbedding"].trt_layers == 2 * cfg.num_layers
        assert routes["llama_trt.RMSNorm"].route == "function"
        assert m.layer_counts["ROTARY_EMBEDDING"] == 2 * cfg.num_layers
    log = (out / "build.log").read_text()
    for stage in ("[lower]", "[parse]", "[configure]", "[build]", "[write]"):
        assert stage in log
    assert "llama_trt.RotaryEmbedding x4 ->" in log
    assert not list(tmp_path.glob(".engine.*"))  # temp folder renamed away


def test_parsed_network_has_rotary_embedding_layers(exports, trt_backend):
    from llama_trt.trt_engines import inspect_network

    if trt_backend.supports_custom_plugins:
        pytest.skip("full TensorRT with plugins routes RoPE to the plugin")
    parsed = inspect_network(exports("tiny", "fp16"), max_context=64)
    layers = 2 * 2  # q and k per layer, 2 layers
    assert parsed.layer_types.count("ROTARY_EMBEDDING") == layers
    assert {r.op: r.trt_layers for r in parsed.routes}["llama_trt.RotaryEmbedding"] == layers
    trt = trt_backend.module()
    rope = [parsed.network.get_layer(i) for i in range(parsed.network.num_layers)
            if parsed.network.get_layer(i).type == trt.LayerType.ROTARY_EMBEDDING]
    rope[0].__class__ = trt.IRotaryEmbeddingLayer
    assert rope[0].interleaved is False and rope[0].rotary_embedding_dim == 16


def test_engine_manifest_matches_library_build(engines):
    out, m = engines("fp32")
    assert load_engine_manifest(out) == m
    from llama_trt.runtime.artifact import resolve_artifact

    art = resolve_artifact(out)
    assert art.kind == "engine" and art.max_context == 128 and art.engine_files == [out / "model.plan"]


def test_int8_qdq_export_builds(exports, trt_backend, rtx_targets, tmp_path):
    from llama_trt.trt_engines import BuildOptions, build_engine
    from tests.trt_engines.qdq import quantize_weights_qdq

    src = exports("tiny", "fp16")
    q = tmp_path / "int8_export"
    shutil.copytree(src, q)
    onnx.save(quantize_weights_qdq(onnx.load(str(src / "model.onnx"))), str(q / "model.onnx"))
    m = build_engine(q, tmp_path / "engine", BuildOptions(max_seq=8, max_context=32, targets=rtx_targets))
    assert m.precision == "int8"
    assert (tmp_path / "engine" / "model.plan").stat().st_size > 0


def test_unparseable_onnx_fails_naming_the_node(exports, trt_backend, tmp_path):
    src = exports("tiny", "fp32")
    bad = tmp_path / "bad_export"
    shutil.copytree(src, bad)
    model = onnx.load(str(bad / "model.onnx"))
    keep = [f for f in model.functions if f.name != "RMSNorm"]
    del model.functions[:]
    model.functions.extend(keep)
    onnx.save(model, str(bad / "model.onnx"))
    first = next(n for n in model.graph.node if n.op_type == "RMSNorm")
    out = tmp_path / "engine"
    r = _cli("build", bad, "-o", out, "--max-seq", 8, "--max-context", 32, "--no-plugins")
    _one_line_error(r, "cannot parse", first.name, "RMSNorm")
    assert not out.exists() and not list(tmp_path.glob(".engine.*"))


@pytest.mark.parametrize("args,needle", [
    (["--max-seq", 64, "--max-context", 32], "--max-seq 64 exceeds --max-context 32"),
    (["--max-context", 100000], "--max-context 100000 exceeds the model's max_position_embeddings"),
    (["--max-batch", 0], "'--max-batch': 0 is not in the range x>=1"),
    (["--target", 90], "--target 90"),
])
def test_bad_options_fail_naming_the_option(exports, trt_backend, tmp_path, args, needle):
    if "--target" in args and not trt_backend.is_rtx:
        needle = "--target is only supported by TensorRT-RTX"
    out = tmp_path / "engine"
    _one_line_error(_cli("build", exports("tiny", "fp32"), "-o", out, *args), needle)
    assert not out.exists()


def test_existing_engine_dir_needs_force(engines, exports, tmp_path):
    out = tmp_path / "engine"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    _one_line_error(_cli("build", exports("tiny", "fp32"), "-o", out, "--max-seq", 8, "--max-context", 32),
                    "already exists", "--force")
    assert (out / "keep.txt").exists()


def test_fp32_sm75_is_refused_up_front(exports, trt_backend, tmp_path):
    if not trt_backend.is_rtx:
        pytest.skip("targets are a TensorRT-RTX feature")
    r = _cli("build", exports("tiny", "fp32"), "-o", tmp_path / "e", "--target", 75, "--max-context", 32)
    _one_line_error(r, "--target 75", "fp32")


def test_int8_weight_export_builds(exports, trt_backend, rtx_targets, tmp_path):
    """The exporter's own INT8 path (`--quantize int8-weight`), when it works in this checkout."""
    from llama_trt.errors import LlamaTrtError
    from llama_trt.exporter import export
    from llama_trt.trt_engines import BuildOptions, build_engine

    ckpt = exports("tiny", "fp16").parent / "tiny_ckpt"
    try:
        export(ckpt, tmp_path / "int8", dtype="fp32", quantize="int8-weight", ort_check=False)
    except (LlamaTrtError, TypeError, ImportError) as e:
        pytest.skip(f"int8-weight export unavailable here: {e}")
    m = build_engine(tmp_path / "int8", tmp_path / "engine",
                     BuildOptions(max_seq=8, max_context=32, targets=rtx_targets))
    assert m.precision == "int8" and m.engine_bytes > 0
