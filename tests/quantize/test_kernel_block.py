"""ONNX Runtime's kernel block for per-channel int8 weights: the session rewrite and its choice.

The rewrite (``ort_pack.int8_kernel_blocks``) writes a per-channel int8 weight in blocks of 64 or
128 along K, the channel's scale repeated: the dequantized weights must be the very same numbers
(logits of a float computation unchanged), and ONNX Runtime must fuse them into ``MatMulNBits``
kernels of that block (its optimized graph, read back). The export records the block its
certificate chose (``quantize/kernel_block.py``) and every later session opens with it.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

from llama_trt.quantize.kernel_block import KernelTrial, choose


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


def test_onnx_runtime_fuses_the_wider_blocks(int8, tmp_path):
    import onnxruntime as ort

    session = _session(int8, int8_block=64)
    try:
        report = session.describe()["fused_ops_rewrite"]
        assert report["per-channel int8 weights in kernel blocks (count @ block)"] == "14 @ 64"  # 2 layers x 7
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(int8))
        ort.InferenceSession(session.graph.model_bytes, so, providers=["CPUExecutionProvider"])
    finally:
        session.close()
    graph = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False).graph
    kernels = sorted((a["K"], a["N"], a["bits"], a["block_size"]) for a in (
        {x.name: onnx.helper.get_attribute_value(x) for x in n.attribute} for n in graph.node
        if n.op_type == "MatMulNBits"))
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


def test_choose_keeps_the_widest_block_that_passes():
    trials = [KernelTrial(32, 0.0033, 0.971, True), KernelTrial(64, 0.0039, 0.968, True)]
    assert choose("auto", trials).block == 64
    assert choose("auto", [trials[0], KernelTrial(64, 0.0051, 0.958, False)]).block == 32
    assert choose("auto", [KernelTrial(32, 0.01, 0.9, False)]).block == 32  # none passes: ORT's own
    assert choose(64, [KernelTrial(64, 0.0051, 0.958, False)]).block == 64  # asked for: kept, and reported


def test_export_records_the_trials(quantized, tmp_path):
    """auto certifies blocks of 32, then 64, keeps the widest that passes (the tiny model passes
    both: KL 0.00023 / 0.00024 on its sampled text) with its certificate; a later certificate, which
    opens the session the way `run` does, measures that same block."""
    from llama_trt.checkpoint import load_checkpoint
    from llama_trt.exporter import load_manifest
    from llama_trt.quantize.pipeline import certify_export
    from llama_trt.validate.teacher_forced import certify

    folder, _ = quantized("int8-weight", certify=False)
    work = tmp_path / "int8"
    shutil.copytree(folder, work)
    ckpt = load_checkpoint(load_manifest(work).source_checkpoint)
    man = certify_export(work, ckpt, load_manifest(work))
    record = man.quantization["ort_kernel"]
    assert [t["int8_block"] for t in record["trials"]] == [32, 64] and all(t["passed"] for t in record["trials"])
    assert record["int8_block"] == 64 and record["requested"] == "auto"
    assert record["trials"][1]["kl"] == round(man.certificate["kl"], 6) and man.certificate["passed"]
    assert json.loads((work / "manifest.json").read_text())["quantization"]["ort_kernel"] == record
    again = certify(work, ckpt, scheme="int8-weight")
    assert round(again.kl, 6) == record["trials"][1]["kl"] != record["trials"][0]["kl"]
