"""ONNX Runtime's kernel form of a quantized export: the session rewrites and their choice.

* int8 kernel blocks (``ort_pack.int8_kernel_blocks``): a per-channel int8 weight written in blocks
  of 64 or 128 along K, the channel's scale repeated: the dequantized weights must be the very same
  numbers (logits of a float computation unchanged), and ONNX Runtime must fuse them into
  ``MatMulNBits`` kernels of that block (its optimized graph, read back).
* the int4 head scan (``ort_head.int4_head_scan``): an int4 export's int8 head finds its candidates
  with an int4 copy of itself; the logits outside the rescored candidates must be those of that
  int4 copy (quantized here in numpy from the ONNX spec's formulas), the candidates' the int8 ones.

The export records the form its certificate chose (``quantize/kernel_form.py``) and every later
session opens with it.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

from llama_trt.quantize.kernel_form import candidates
from llama_trt.quantize.schemes import OrtKernelForm


def _session(folder, **kw):
    from llama_trt.runtime import open_session, resolve_artifact

    return open_session(resolve_artifact(folder), "onnxruntime", threads=1, cache=False, **kw)


def _logits(folder, ids, **kw):
    from llama_trt.validate.teacher_forced import session_logits_fn

    session = _session(folder, **kw)
    try:
        return session_logits_fn(session)(ids)
    finally:
        session.close()


@pytest.fixture(scope="module")
def int8(quantized):
    folder, _ = quantized("int8-weight", certify=False)
    return folder


def test_wider_blocks_are_the_same_weights(int8):
    ids = np.random.default_rng(0).integers(0, 128, (2, 12)).astype(np.int64)
    # accuracy level 1: MatMulNBits in fp32, the graph's own semantics: only the weights' form moved
    plain = _logits(int8, ids, nbits_accuracy_level=1, int8_block=32)
    for block in (64, 128):
        wide = _logits(int8, ids, nbits_accuracy_level=1, int8_block=block)
        assert np.abs(wide - plain).max() < 1e-5, (block, np.abs(wide - plain).max())


def _kernels(folder, tmp_path, **kw):
    """(K, N, bits, block) of every MatMulNBits in ONNX Runtime's optimized session graph."""
    import onnxruntime as ort

    session = _session(folder, **kw)
    try:
        report = session.describe()
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
        ort.InferenceSession(session.graph.model_bytes, so, providers=["CPUExecutionProvider"])
    finally:
        session.close()
    graph = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False).graph
    return report, sorted((a["K"], a["N"], a["bits"], a["block_size"]) for a in (
        {x.name: onnx.helper.get_attribute_value(x) for x in n.attribute} for n in graph.node
        if n.op_type == "MatMulNBits"))


def test_onnx_runtime_fuses_the_wider_blocks(int8, tmp_path):
    report, kernels = _kernels(int8, tmp_path, int8_block=64)
    assert report["fused_ops_rewrite"]["per-channel int8 weights in kernel blocks (count @ block)"] == "14 @ 64"
    # per layer: q/k/v packed (64 -> 64 + 32 + 32), o, gate, up, down (96 -> 64, two blocks of 64,
    # the second padded); the lm head (64 -> vocab 128) keeps its real blocks of 32
    assert kernels == sorted([(64, 128, 8, 64), (64, 64, 8, 64), (64, 96, 8, 64), (64, 96, 8, 64),
                              (96, 64, 8, 64)] * 2 + [(64, 128, 8, 32)]), kernels


def test_the_session_opens_with_the_exports_block(int8, tmp_path):
    from llama_trt.runtime.artifact import ArtifactError

    folder = tmp_path / "copy"
    shutil.copytree(int8, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["quantization"]["ort_kernel"]["int8_block"] == 32  # not certified: ORT's own
    manifest["quantization"]["ort_kernel"]["int8_block"] = 64
    (folder / "manifest.json").write_text(json.dumps(manifest))
    session = _session(folder)
    try:
        assert session.int8_block == 64 and session.describe()["int8_kernel_block"] == 64
    finally:
        session.close()
    manifest["quantization"]["ort_kernel"]["int8_block"] = 48
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="int8 kernel block 48 is not one of"):
        _session(folder)


def test_candidates_run_from_the_fastest_form():
    assert candidates("int8-weight", "int8", {}) == [OrtKernelForm(int8_block=64), OrtKernelForm(int8_block=32)]
    assert candidates("int8-weight", "float", {"int8_block": 128}) == [OrtKernelForm(int8_block=128)]
    assert candidates("int4-awq", "int8", {}) == [OrtKernelForm(head_scan_bits=4, head_scan_block=64),
                                                  OrtKernelForm(head_scan_bits=8)]
    assert candidates("int4-rtn", "int8", {"head_scan_bits": 8}) == [OrtKernelForm(head_scan_bits=8)]
    # nothing to choose: an int4 head has no int8 head to scan; int8-sq runs no MatMulNBits
    assert candidates("int4-awq", "int4", {}) == candidates("int4-awq", "float", {}) == []
    assert candidates("int8-sq", "float", {}) == []


def test_the_scan_block_a_record_names_or_implies():
    # exports certified before the block was recorded scanned in blocks of 32
    assert OrtKernelForm.from_record({"head_scan_bits": 4}).head_scan_block == 32
    assert OrtKernelForm.from_record({"head_scan_bits": 4, "head_scan_block": 64}).head_scan_block == 64
    assert OrtKernelForm(head_scan_bits=4).head_scan_block == 64  # a new scan
    assert OrtKernelForm.from_record({"head_scan_bits": 8, "head_scan_block": 64}) == OrtKernelForm()  # no copy
    assert OrtKernelForm.from_record({}) == OrtKernelForm(head_scan_bits=8)
    forms = [OrtKernelForm(head_scan_bits=4, head_scan_block=b) for b in (32, 64)] + [OrtKernelForm()]
    assert len({f.key() for f in forms}) == 3  # each its own cached session graph
    with pytest.raises(ValueError, match="head scan block 48 is not one of"):
        OrtKernelForm.from_record({"head_scan_bits": 4, "head_scan_block": 48})
    with pytest.raises(ValueError, match="is not an integer"):
        OrtKernelForm.from_record({"head_scan_bits": 4, "head_scan_block": "64"})


@pytest.mark.parametrize("scheme, kw, field, fast", [("int8-weight", {}, "int8_block", 64),
                                                     ("int4-awq", {"group_size": 32}, "head_scan_bits", 4)])
def test_export_records_the_trials(quantized, tmp_path, scheme, kw, field, fast):
    """auto certifies the fastest form first and keeps it when it passes (the tiny model passes
    with either: int8-weight KL 0.00024 at 64; int4-awq g32 KL 0.0209 with the int4 scan, 0.0198
    without), with its certificate; a later certificate, which opens the session the way `run`
    does, measures that same form."""
    from llama_trt.checkpoint import load_checkpoint
    from llama_trt.exporter import load_manifest
    from llama_trt.quantize.pipeline import certify_export
    from llama_trt.validate.teacher_forced import certify

    folder, _ = quantized(scheme, certify=False, **kw)
    work = tmp_path / scheme
    shutil.copytree(folder, work)
    ckpt = load_checkpoint(load_manifest(work).source_checkpoint)
    man = certify_export(work, ckpt, load_manifest(work))
    record = man.quantization["ort_kernel"]
    assert [t[field] for t in record["trials"]] == [fast] and record["trials"][0]["passed"]
    assert record[field] == fast and record["requested"] == "auto"
    assert record["trials"][0]["kl"] == round(man.certificate["kl"], 6) and man.certificate["passed"]
    assert json.loads((work / "manifest.json").read_text())["quantization"]["ort_kernel"] == record
    again = certify(work, ckpt, scheme=scheme)
    ort_own = certify(work, ckpt, scheme=scheme, session_options={field: OrtKernelForm.__dataclass_fields__[field].default})
    assert round(again.kl, 6) == record["trials"][0]["kl"] != round(ort_own.kl, 6)


class _Cert:
    def __init__(self, kl, passed):
        self.kl, self.top1, self.passed = kl, 0.9, passed

    def to_dict(self):
        return {"kl": self.kl, "passed": self.passed}


@pytest.mark.parametrize("passes, kept, tried", [((True, True), 4, [4]), ((False, True), 8, [4, 8]),
                                                 ((False, False), 8, [4, 8])])
def test_the_first_passing_form_is_kept_else_the_most_accurate(monkeypatch, tmp_path, passes, kept, tried):
    from types import SimpleNamespace

    from llama_trt.quantize import kernel_form
    from llama_trt.validate import reference, teacher_forced

    asked = []

    def fake_certify(folder, ckpt, *, session_options, **_):
        asked.append(session_options["head_scan_bits"])
        return _Cert(0.1 * len(asked), passes[len(asked) - 1])

    monkeypatch.setattr(teacher_forced, "certify", fake_certify)
    monkeypatch.setattr(reference, "reference_for", lambda ckpt, ref: None)
    record = kernel_form.initial_record("int4-awq", "int8", {})
    assert record["head_scan_bits"] == 8 and record["trials"] == []  # not certified: ONNX Runtime's own
    manifest = SimpleNamespace(quantization={"scheme": "int4-awq", "lm_head": "int8", "ort_kernel": record},
                               to_json=lambda: "{}")
    monkeypatch.setattr(kernel_form, "replace", lambda m, **kw: SimpleNamespace(**{**vars(m), **kw}))
    out = kernel_form.certify_kernel_forms(tmp_path, None, manifest)
    got = out.quantization["ort_kernel"]
    assert asked == tried and got["head_scan_bits"] == kept and [t["head_scan_bits"] for t in got["trials"]] == tried
    assert out.certificate == {"kl": 0.1 * len(tried), "passed": passes[len(tried) - 1]}  # the kept trial's
    assert got["chosen_by"] == ("the fastest form whose certificate passes" if passes[len(tried) - 1]
                                else "none passed: the most accurate")


@pytest.fixture(scope="module")
def int4(quantized):
    folder, _ = quantized("int4-awq", certify=False, group_size=32)
    return folder


def _int8_head(folder):
    """The export's int8 head, dequantized per the ONNX spec: q [H, V] * scale repeated along H."""
    from onnx import numpy_helper

    model = onnx.load(str(folder / "model.onnx"))
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    dq = producer[producer["logits"].input[1]]
    q, scale = inits[dq.input[0]], inits[dq.input[1]]
    block = next(a.i for a in dq.attribute if a.name == "block_size")
    assert q.dtype == np.int8 and scale.shape == (q.shape[0] // block, q.shape[1])
    return q.astype(np.float32) * np.repeat(scale, block, axis=0)


def _int4_of(w, block=32):
    """Symmetric int4 blocks along K, the formulas written out: s = max|w| / 7, q = clip(round(w / s), -8, 7)."""
    k, n = w.shape
    b = w.reshape(k // block, block, n)
    s = np.abs(b).max(axis=1, keepdims=True) / 7
    return (np.clip(np.rint(b / s), -8, 7) * s).reshape(k, n)


@pytest.mark.parametrize("block, rescored", [(32, 32), (64, 64)])
def test_int4_head_scan_keeps_the_int8_candidates(int4, block, rescored):
    """At accuracy level 1 (fp32 activations: the graph's own arithmetic) the logits with the int8
    head are x @ W8, from which the head's input x is solved back; with the int4 scan in blocks of
    ``block`` the session's ``rescored`` best-ranked logits per position must be x @ W8 and the
    others (of vocab 128) x @ W4."""
    ids = np.random.default_rng(1).integers(0, 128, (2, 10)).astype(np.int64)
    w8 = _int8_head(int4)
    exact = _logits(int4, ids, nbits_accuracy_level=1, head_scan_bits=8)
    scanned = _logits(int4, ids, nbits_accuracy_level=1, head_scan_bits=4, head_scan_block=block)
    x = np.linalg.lstsq(w8.T, exact.reshape(-1, w8.shape[1]).T, rcond=None)[0].T   # [positions, H]
    assert np.abs(x @ w8 - exact.reshape(x.shape[0], -1)).max() < 1e-4
    approx = x @ _int4_of(w8, block)
    top = np.argsort(-approx, axis=1)[:, :rescored]
    want = approx.copy()
    np.put_along_axis(want, top, np.take_along_axis(x @ w8, top, axis=1), axis=1)
    got = scanned.reshape(want.shape)
    assert np.abs(got - want).max() < 1e-3 * np.abs(want).max(), np.abs(got - want).max()
    assert np.abs(approx - x @ w8).max() > 1e-2  # the int4 copy is not the int8 head: the test can tell them apart


def test_onnx_runtime_runs_the_head_scan_as_4_bit(int4, tmp_path):
    report, scanned = _kernels(int4, tmp_path, head_scan_bits=4)
    assert report["head_scan_bits"] == 4 and report["head_scan_block"] == 64
    assert report["fused_ops_rewrite"]["int8 lm head: candidates found by an int4 copy of it"] == \
        "int4 in blocks of 64, 64 rescored"
    _, plain = _kernels(int4, tmp_path, head_scan_bits=8)
    # the layers' kernels are the same; the head (K 64 -> vocab 128) goes from 8 bits to 4 in blocks of 64
    assert sorted(set(plain) - set(scanned)) == [(64, 128, 8, 32)] and (64, 128, 4, 64) in scanned
    assert len(plain) == len(scanned) and {k[2] for k in scanned} == {4}


def test_the_demo_chooses_the_kernel_form_as_export_does(quantized, tied_ckpt, tmp_path):
    """The real demo exports with certify=False and certifies in its validate stage; there it first
    lets the quantized export choose its kernel form (as `llama-trt export` does by default), so the
    validation, chat and bench see the form a user's export gets, and validate's certificate is the
    kept trial's."""
    import io

    from rich.console import Console

    from llama_trt.demo.stages import validate_all

    folder, _ = quantized("int4-awq", certify=False, group_size=32)
    work = tmp_path / "onnx-int4-awq"
    shutil.copytree(folder, work)
    assert json.loads((work / "manifest.json").read_text())["quantization"]["ort_kernel"]["trials"] == []
    stages = []
    (tmp_path / "out").mkdir()
    reports = validate_all({"onnx-int4-awq": work}, tied_ckpt, tmp_path / "out", stages.append,
                           Console(file=io.StringIO()), steps=4, kernel_forms=True)
    record = json.loads((work / "manifest.json").read_text())["quantization"]["ort_kernel"]
    assert [t["head_scan_bits"] for t in record["trials"]] == [4] and record["head_scan_bits"] == 4, record
    assert any("kernel form" in s for s in stages), stages
    report = reports["onnx-int4-awq"][0]
    assert round(report.metric("kl").value, 6) == record["trials"][0]["kl"]
