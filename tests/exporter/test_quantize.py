"""INT8 quantization (exporter/quantize.py) on the trained stories260K model.

One fp32 export (session fixture); the int8 variants are quantized from it with
``quantize_folder`` (seconds); one CLI end-to-end run covers ``--calib-data`` and the
manifest. Held-out text for perplexity / KL / top-1: a seeded sample (T = 1, seed 1234)
of the fp32 export from BOS, 128 tokens (``heldout_tokens``). Greedy: 64 steps from BOS.

Accuracy thresholds are the measured figures of this 260K-parameter model plus margin
(see the figures in each test); DESIGN.md: small models lose more under int8.
"""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="session")
def q_root(tmp_path_factory):
    return tmp_path_factory.mktemp("quantize")


@pytest.fixture(scope="session")
def fp32_dir(stories260k, q_root):
    from llama_trt.exporter import export

    out = q_root / "fp32"
    export(stories260k, out, dtype="fp32", ort_check=False)
    return out


@pytest.fixture(scope="session")
def state_dict(stories260k):
    from llama_trt.checkpoint import load_checkpoint

    return load_checkpoint(stories260k).state_dict


def _quantize(fp32_dir, q_root, state_dict, name, scheme, **kw):
    from llama_trt.exporter.quantize import parse_options, quantize_folder

    out = q_root / name
    out.mkdir()
    manifest = quantize_folder(fp32_dir, out, parse_options(scheme, **kw), state_dict=state_dict)
    shutil.copy2(fp32_dir / "manifest.json", out / "base_manifest.json")
    return out, manifest


@pytest.fixture(scope="session")
def w8(fp32_dir, q_root, state_dict):
    # the decoder layers' int8 only: the head's int8 form and accuracy are tests/quantize's
    return _quantize(fp32_dir, q_root, state_dict, "int8-weight", "int8-weight", quantize_lm_head=False)


@pytest.fixture(scope="session")
def sq(fp32_dir, q_root, state_dict):
    # all layers W8A8 (KL ~0.19 on this 260K model): the target is raised so nothing falls back or refuses
    return _quantize(fp32_dir, q_root, state_dict, "int8-sq", "int8-sq", sq_target_kl=1.0)


@pytest.fixture(scope="session")
def w8_keep_l0(fp32_dir, q_root, state_dict):
    return _quantize(fp32_dir, q_root, state_dict, "int8-weight-keep-l0", "int8-weight", exclude=["model.layers.0.*"],
                     quantize_lm_head=False)


@pytest.fixture(scope="session")
def report(fp32_dir, w8, sq, w8_keep_l0):
    from llama_trt.exporter.quantize import accuracy_report

    dirs = [w8[0], sq[0], w8_keep_l0[0]]
    return {"ort_default": accuracy_report(fp32_dir, dirs), "exact": accuracy_report(fp32_dir, dirs, exact=True)}


def _cand(report, folder, mode="exact"):
    return report[mode]["candidates"][str(folder)]


def _fp32_weights(fp32_dir, state_dict):
    from llama_trt.exporter.quantize import analyse_graph

    m = onnx.load(str(fp32_dir / "model.onnx"))
    info = analyse_graph(m, state_dict)
    arrays = {s.name: onnx.numpy_helper.to_array(next(i for i in m.graph.initializer if i.name == s.weight))
              for s in info.sites}
    return info, arrays


# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["w8", "sq"])
def test_graph_has_explicit_int8_qdq(which, request, fp32_dir, state_dict):
    from llama_trt.exporter.quantize import inspect_quantized
    from llama_trt.plugins.onnx_support import register_all_schemas

    folder, manifest = request.getfixturevalue(which)
    register_all_schemas()
    onnx.checker.check_model(str(folder / "model.onnx"), full_check=True)
    model = onnx.load(str(folder / "model.onnx"))
    facts = inspect_quantized(model)
    inits = {i.name: i for i in model.graph.initializer}
    quantized = manifest.quantization["quantized"]
    info, fp32 = _fp32_weights(fp32_dir, state_dict)
    # every quantized linear: int8 [K, N] weight, per-channel scale [N] on axis 1, zero point 0
    weight_dq = {d["input"]: d for d in facts["dequantize"] if d["weight"]}
    for name in quantized:
        q = inits[f"{name}.weight_t_quantized"]
        assert q.data_type == onnx.TensorProto.INT8
        k, n = fp32[name].shape
        assert list(q.dims) == [k, n]
        d = weight_dq[q.name]
        assert d["axis"] == 1 and d["scale_shape"] == [n] and d["scale_dtype"] == onnx.TensorProto.FLOAT
        zp = onnx.numpy_helper.to_array(inits[d["zero_point"]])
        assert zp.dtype == np.int8 and not zp.any()
        assert onnx.numpy_helper.to_array(q).min() >= -127
    assert facts["zero_points_all_zero"]
    # no fp32 copy of a quantized weight (nor of its smoothed version: compare names and values)
    floats = [onnx.numpy_helper.to_array(i) for i in model.graph.initializer if i.data_type == 1 and len(i.dims) == 2]
    for name in quantized:
        assert f"{name}.weight_t" not in inits
        for arr in floats:
            assert not (arr.shape == fp32[name].shape and np.array_equal(arr, fp32[name])), name
    # plugin nodes and their function bodies survive
    assert facts["functions"] == ["RMSNorm", "RotaryEmbedding"]
    assert facts["plugin_nodes"] == 21  # 11 RMSNorm + 10 RotaryEmbedding
    # 35 decoder linears; the (tied) lm head float (int8-sq's default; --no-quantize-lm-head for w8)
    assert len(quantized) == 35
    if which == "sq":
        q_inputs = {q["input"] for q in facts["quantize"]}
        assert len(facts["quantize"]) == 20  # per layer: norm out x2, attention out, SwiGLU out
        consumers = {n.input[0] for n in model.graph.node if n.op_type == "MatMul"}
        assert all(f"{t}_DequantizeLinear_Output" in consumers for t in q_inputs)
        assert all(inits[q["scale"]].dims == [] for q in facts["quantize"])  # per-tensor
    else:
        assert facts["quantize"] == []  # weight-only: no activation quantization
    assert manifest.model_bytes < json.loads((folder / "base_manifest.json").read_text())["model_bytes"]


def test_smoothing_is_exact_in_float(fp32_dir, state_dict):
    import onnxruntime as ort

    from llama_trt.exporter import load_manifest
    from llama_trt.exporter.feeds import build_feeds, split_outputs
    from llama_trt.exporter.quantize import activation_absmax, analyse_graph, smooth, smoothing_groups

    man = load_manifest(fp32_dir)
    model = onnx.load(str(fp32_dir / "model.onnx"))
    info = analyse_graph(model, state_dict)
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 512, (2, 24)) for _ in range(2)]
    groups = smoothing_groups(model, info.sites)
    assert len(groups) == 11  # input + post-attention norm of 5 layers + final norm -> lm head
    act = activation_absmax(model, man, batches, [g[1] for g in groups])
    before = model.SerializeToString()
    stats = smooth(model, groups, act, 0.5)
    assert max(s["max"] for s in stats.values()) / min(s["min"] for s in stats.values()) > 2  # it did something
    ids = rng.integers(0, 512, (2, 20))
    outs = []
    for blob in (before, model.SerializeToString()):
        sess = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
        outs.append(split_outputs(man, sess.run(None, build_feeds(man, ids)))[0])
    assert np.abs(outs[0] - outs[1]).max() < 1e-4


def test_int8_weight_accuracy(report, w8, w8_keep_l0):
    # measured with AWQ + GPTQ (exact graph semantics): ppl ratio 1.008, KL 0.020, top-1 0.90,
    # teacher-forced greedy 0.94 (AWQ alone: 1.052 / 0.035 / 0.87 / 0.92); free-running greedy
    # flips on near-ties (fp32 top-2 margins of 0.003 logits), so it is reported, not gated here.
    c = _cand(report, w8[0])
    assert c["perplexity_ratio"] < 1.03
    assert c["kl_mean"] < 0.03 and c["top1_agreement"] > 0.87
    assert c["greedy_teacher_forced"] >= 0.90
    # ORT's default CPU path (DQ+MatMul -> MatMulNBits, int8 compute) loses a bit more
    d = _cand(report, w8[0], "ort_default")
    assert d["perplexity_ratio"] < 1.05 and d["kl_mean"] < 0.045
    # layer 0 carries most of the remaining error on this model: kept in fp32, KL 0.0075
    k = _cand(report, w8_keep_l0[0])
    assert k["perplexity_ratio"] < 1.02 and k["kl_mean"] < 0.6 * c["kl_mean"]
    assert k["greedy_teacher_forced"] >= 0.93


def test_int8_sq_accuracy(report, sq):
    # measured: ppl ratio 1.25 exact / 1.35 ORT default, KL 0.19 / 0.26: per-tensor int8
    # activations are hard on a 64-wide, 5-layer model; the gate catches breakage only.
    c = _cand(report, sq[0])
    assert c["perplexity_ratio"] < 1.45
    assert c["kl_mean"] < 0.35 and c["top1_agreement"] > 0.55


def test_print_accuracy_report(report, capsys):
    def short(r):
        return {c["scheme"] + ("" if "keep" not in k else "(layer0 fp32)"): {
            m: round(c[m], 4) for m in ("perplexity_ratio", "kl_mean", "top1_agreement", "greedy_agreement",
                                         "greedy_teacher_forced")} for k, c in r["candidates"].items()}

    with capsys.disabled():
        print("\nINT8 accuracy vs fp32 (stories260K):",
              json.dumps({mode: short(r) for mode, r in report.items()}, indent=1))


# ---------------------------------------------------------------------------------------
# validate (the validate stage's metrics and tolerances)
INT8_STORIES_TOLS = {"kl": 0.1, "kl_p99": 0.5, "top1": 0.75, "cosine": 0.98, "ppl_ratio": 1.1}  # 260K params: ppl x1.037


def test_validate_int8_weight_passes_and_broken_scale_fails(w8, stories260k, q_root):
    from click.testing import CliRunner

    from llama_trt.cli import main

    tols = [f"--tol={k}={v}" for k, v in INT8_STORIES_TOLS.items()]
    r = CliRunner().invoke(main, ["validate", str(w8[0]), "--checkpoint", str(stories260k), "--steps", "64", *tols])
    assert r.exit_code == 0, r.output
    assert "int8" in r.output
    broken = q_root / "broken-scale"
    shutil.copytree(w8[0], broken)
    model = onnx.load(str(broken / "model.onnx"))
    name = "model.layers.4.self_attn.v_proj.weight_t_scale"
    init = next(i for i in model.graph.initializer if i.name == name)
    init.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init) * 1.5, name))
    onnx.save(model, str(broken / "model.onnx"))
    r = CliRunner().invoke(main, ["validate", str(broken), "--checkpoint", str(stories260k), "--steps", "64", *tols])
    assert r.exit_code == 1, r.output
    assert "FAILED" in r.output


# ---------------------------------------------------------------------------------------
# CLI: manifest, --calib-data, errors
def test_cli_int8_sq_with_token_id_file(stories260k, q_root, fp32_dir):
    from click.testing import CliRunner

    from llama_trt.cli import main
    from llama_trt.exporter import load_manifest
    from llama_trt.exporter.quantize import heldout_tokens

    ids = np.concatenate([heldout_tokens(fp32_dir, 128, seed=s) for s in (7, 8)])
    calib = q_root / "calib_ids.txt"
    calib.write_text(", ".join(str(int(i)) for i in ids))
    out = q_root / "cli-sq"
    r = CliRunner().invoke(main, ["export", str(stories260k), "-o", str(out), "--quantize", "int8-sq",
                                  "--calib-data", str(calib), "--calib-samples", "3", "--sq-alpha", "0.6",
                                  "--sq-target-kl", "1.0"])
    assert r.exit_code == 0, r.output
    m = load_manifest(out)
    q = m.quantization
    assert m.dtype == "int8" and q["scheme"] == "int8-sq" and q["sq_alpha"] == 0.6
    assert q["calibration"]["sha256"] == hashlib.sha256(calib.read_bytes()).hexdigest()
    assert q["calibration"]["samples"] == 3 and q["calibration"]["seq_len"] == 64
    assert q["activations"]["granularity"] == "per-tensor" and q["weights"]["axis"] == 1
    assert "lm_head" not in q["quantized"] and any(e["name"] == "lm_head" for e in q["excluded"])
    assert any("attention" in e["reason"] for e in q["excluded"])
    assert q["smoothing"]["alpha"] == 0.6 and len(q["smoothing"]["smoothed_norms"]) == 10
    assert q["library"]["onnxruntime"]
    assert json.loads((out / "manifest.json").read_text())["quantization"]["scheme"] == "int8-sq"
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx"]
    # the export-time certificate (validate's teacher-forced metrics) is in the manifest
    assert m.certificate["scheme"] == "int8-sq" and m.certificate["tokens"] > 100


def test_builtin_calibration_is_recorded(sq):
    cal = sq[1].quantization["calibration"]
    assert cal["source"].startswith("builtin:") and cal["samples"] == 16 and len(cal["sha256"]) == 64


@pytest.mark.parametrize("args, needle", [
    (["--quantize", "int4"], "'int4' is not one of 'int8-weight', 'int8-sq', 'int4-awq', 'int4-rtn'"),
    (["--quantize", "int8-weight", "--group-size", "32"], "apply to int4 schemes"),
    (["--quantize", "int4-rtn", "--calib-data", "MISSING"], "only applies to calibrated schemes"),
    (["--quantize", "int4-awq", "--group-size", "48"], "'48' is not one of '32', '64', '128'"),
    (["--quantize", "int8-sq", "--calib-data", "MISSING"], "file not found"),
    (["--quantize", "int8-sq", "--calib-data", "FLOATNPY"], "token ids must be integers"),
    (["--quantize", "int8-sq", "--sq-alpha", "1.5"], "'--sq-alpha': 1.5 is not in the range 0.0<=x<=1.0"),
    (["--sq-alpha", "0.5"], "need --quantize"),
    (["--quantize", "int4-rtn", "--int8-kernel-block", "64"], "applies to --quantize int8-weight"),
    (["--quantize", "int8-weight", "--int8-kernel-block", "48"], "'48' is not one of 'auto', '32', '64', '128'"),
    (["--int8-kernel-block", "64"], "need --quantize"),
    (["--quantize", "int8-weight", "--head-scan-bits", "4"], "applies to int4 schemes with the lm head int8"),
    (["--quantize", "int4-awq", "--quantize-lm-head", "--head-scan-bits", "4"],
     "not int4-awq with the head int4"),
    (["--quantize", "int4-rtn", "--head-scan-bits", "2"], "'2' is not one of 'auto', '4', '8'"),
    (["--head-scan-bits", "4"], "need --quantize"),
])
def test_cli_bad_quantize_options(args, needle, stories260k, tmp_path):
    from click.testing import CliRunner

    from llama_trt.cli import main

    np.save(tmp_path / "f.npy", np.zeros(8, np.float32))
    args = [str(tmp_path / "nope.txt") if a == "MISSING" else str(tmp_path / "f.npy") if a == "FLOATNPY" else a
            for a in args]
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["export", str(stories260k), "-o", str(out), *args])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], r.output
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["f.npy"]


def test_calibration_file_parsing(tmp_path):
    from llama_trt.errors import ExportError
    from llama_trt.exporter.calibration import load_calibration_file

    (tmp_path / "a.txt").write_text("1 5, 7\n9 11 13 15 17 19 21")
    d = load_calibration_file(tmp_path / "a.txt", vocab_size=512, samples=8, seq_len=4)
    assert d.tokens.tolist() == [[1, 5, 7, 9], [11, 13, 15, 17]]
    np.save(tmp_path / "b.npy", np.arange(12).reshape(3, 4))
    assert load_calibration_file(tmp_path / "b.npy", vocab_size=512, samples=2).tokens.shape == (2, 4)
    (tmp_path / "c.txt").write_text("1 2 999")
    with pytest.raises(ExportError, match="outside the vocabulary"):
        load_calibration_file(tmp_path / "c.txt", vocab_size=512, samples=2)
    (tmp_path / "d.txt").write_text("Once upon a time")
    with pytest.raises(ExportError, match="no tokenizer"):
        load_calibration_file(tmp_path / "d.txt", vocab_size=512, samples=2)
