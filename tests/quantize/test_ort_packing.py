"""How the runtime's ONNX Runtime session runs quantized exports (runtime/sessions/ort_pack.py):
q/k/v packed into one quantized weight, all-zero int8 zero points dropped, and
every quantized GEMM still fused by ONNX Runtime into ``MatMulNBits`` (its fast kernel). That the
packed session computes the dequantized model is test_runtime_and_refusal.py's check."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest


def _optimized_graph(session, tmp_path) -> onnx.GraphProto:
    """The graph ONNX Runtime actually runs (its own optimizer's output)."""
    import onnxruntime as ort

    so = session._so
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(session.graph.source(), so, providers=["CPUExecutionProvider"])
    return onnx.load(so.optimized_model_filepath).graph


def _optimized_ops(session, tmp_path) -> collections.Counter:
    """Op types of the graph ONNX Runtime actually runs."""
    return collections.Counter(n.op_type for n in _optimized_graph(session, tmp_path).node)


SCHEMES = [("int4-rtn", {"group_size": 32}), ("int4-rtn", {"group_size": 32, "int4_zero_point": True}),
           ("int4-rtn", {"group_size": 32, "quantize_lm_head": True}), ("int8-weight", {"quantize_lm_head": True})]


@pytest.mark.parametrize("scheme, kw", SCHEMES)
def test_projections_are_packed_and_fused(quantized, tmp_path, scheme, kw):
    from llama_trt.runtime import open_session, resolve_artifact

    folder, manifest = quantized(scheme, **kw)
    layers = int(manifest.config["num_layers"])
    session = open_session(resolve_artifact(folder), "onnxruntime", threads=1)
    rewrite = session.describe()["fused_ops_rewrite"]
    before, after = map(int, rewrite["quantized MatMuls with one input packed (+ Split)"].split(" -> "))
    assert before - after == 2 * layers  # q/k/v -> 1 per layer (gate/up stay two GEMMs)
    dropped = rewrite["all-zero int8 zero points dropped (symmetric MatMulNBits)"]
    if scheme == "int8-weight":
        assert dropped == before - 1  # every per-channel int8 weight (the blocked head is written without one)
    ops = _optimized_ops(session, tmp_path)
    assert ops["MatMulNBits"] == after, ops  # every quantized GEMM, packed or not, runs fused
    # an int4 tied head: the embedding looks its rows up in the int4 table, never dequantizes it whole
    int4_head = scheme.startswith("int4") and kw.get("quantize_lm_head")
    assert rewrite["embedding rows gathered from the int4 table (GatherBlockQuantized)"] == (1 if int4_head else 0)
    assert ops["DequantizeLinear"] == 0, ops


def test_int4_tied_head_rows_equal_the_dequantized_model(quantized, tmp_path):
    from tests.quantize.test_runtime_and_refusal import _dequantized_copy, _logits

    folder, _ = quantized("int4-rtn", group_size=32, quantize_lm_head=True)
    ids = np.random.default_rng(1).integers(0, 128, (2, 9)).astype(np.int64)
    got, desc = _logits(folder, ids)
    assert desc["fused_ops_rewrite"]["embedding rows gathered from the int4 table (GatherBlockQuantized)"] == 1
    # the form ONNX Runtime 1.22 (setup.py's minimum) loads: 4 bits by the data's type, no `bits`
    # attribute (1.22 refuses it: checked against onnxruntime 1.22.0, 1.30.0 and 1.32.0 wheels)
    from llama_trt.runtime import open_session, resolve_artifact

    session = open_session(resolve_artifact(folder), "onnxruntime", threads=1)
    try:
        graph = onnx.ModelProto.FromString(session.graph.model_bytes).graph
    finally:
        session.close()
    lookups = [n for n in graph.node if n.op_type == "GatherBlockQuantized"]
    assert len(lookups) == 1 and "bits" not in {a.name for a in lookups[0].attribute}, lookups
    want, _ = _logits(_dequantized_copy(folder, tmp_path / "dq"), ids)
    assert np.abs(got - want).max() < 1e-3, np.abs(got - want).max()


def test_fp16_tied_table_is_gathered_by_rows(quantized, tmp_path):
    """int8-weight with --no-quantize-lm-head keeps a tied head float and stores the table once, in fp16 behind a Cast: the
    session's embedding Gather reads the fp16 table (casting only its rows), so ONNX Runtime holds
    no fp32 table for it; the logits equal a plain ONNX Runtime run of the dequantized export."""
    import onnxruntime as ort

    from llama_trt.exporter.feeds import build_feeds
    from llama_trt.runtime import open_session, resolve_artifact
    from llama_trt.validate.teacher_forced import session_logits_fn
    from tests.quantize.test_runtime_and_refusal import _dequantized_copy

    folder, manifest = quantized("int8-weight", quantize_lm_head=False)
    session = open_session(resolve_artifact(folder), "onnxruntime", threads=1, nbits_accuracy_level=1)
    assert session.describe()["fused_ops_rewrite"]["embedding rows gathered from the fp16 table, then cast"] == 1
    graph = _optimized_graph(session, tmp_path)
    dtypes = {t.name: t.data_type for t in graph.initializer}
    gathers = [n for n in graph.node if n.op_type == "Gather" and n.input[0] in dtypes]
    assert [dtypes[n.input[0]] for n in gathers] == [onnx.TensorProto.FLOAT16], gathers

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph as written
    plain = ort.InferenceSession(str(_dequantized_copy(folder, tmp_path / "dq") / "model.onnx"), so,
                                 providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(2).integers(0, int(manifest.config["vocab_size"]), (1, 7)).astype(np.int64)
    want = plain.run(["logits"], build_feeds(manifest, ids))[0]
    got = session_logits_fn(session)(ids)
    assert np.abs(got - want).max() < 1e-4, np.abs(got - want).max()


def _float_head_copy(folder, dest):
    """``folder``'s model with only the lm head's DequantizeLinear replaced by its float value
    (onnx.reference, the spec): the same int8 body, the head computed in fp32 from the same
    int8 weights. The embedding keeps gathering the integer rows."""
    import shutil

    import onnx
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    shutil.copytree(folder, dest)
    model = onnx.load(str(dest / "model.onnx"))
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    head = next(n for n in g.node if n.op_type == "MatMul" and n.output[0] == "logits")
    dq = next(n for n in g.node if n.output[0] == head.input[1])
    sub = helper.make_graph([dq], "dq", [], [helper.make_tensor_value_info(dq.output[0], 1, None)],
                            [inits[i] for i in dq.input])
    value = ReferenceEvaluator(helper.make_model(sub, opset_imports=[helper.make_opsetid("", 23)])).run(None, {})[0]
    g.initializer.append(numpy_helper.from_array(value.astype(np.float32), dq.output[0]))
    nodes = [n for n in g.node if n is not dq]
    del g.node[:]
    g.node.extend(nodes)
    onnx.save(model, str(dest / "model.onnx"))
    return dest


@pytest.fixture(scope="module")
def per_channel_head(tied_ckpt, tied_fp32, tmp_path_factory):
    """int8-weight whose head is per output channel (what a K that 32 does not divide gets, and
    what exports before the blocked head hold): the block size made not to divide K = 64."""
    from llama_trt.checkpoint import load_checkpoint
    from llama_trt.quantize import schemes
    from llama_trt.quantize.pipeline import quantize_folder

    out = tmp_path_factory.mktemp("per-channel-head")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(schemes, "HEAD_INT8_BLOCK", 48)
        manifest = quantize_folder(tied_fp32, out, schemes.parse_options("int8-weight"),
                                   state_dict=load_checkpoint(tied_ckpt).state_dict)
    assert manifest.quantization["lm_head"] == "int8" and manifest.quantization["lm_head_block_size"] is None
    return out


@pytest.mark.parametrize("scheme, kw", [("int8-weight", {}), ("int4-rtn", {"group_size": 32}), ("per-channel", {})])
def test_int8_head_rescores_its_best_logits_in_fp32(quantized, per_channel_head, tmp_path, scheme, kw):
    """At ONNX Runtime's default accuracy level (int8 activations in MatMulNBits) the int8 head's
    k best logits per position are recomputed with fp32 activations: they equal those of the same
    model with only the head dequantized to float (same body, same level), while the kernel's own
    logits elsewhere are off by far more; the argmax is the float head's."""
    from llama_trt.runtime import open_session, resolve_artifact
    from llama_trt.runtime.sessions.ort_head import RESCORE_K
    from llama_trt.validate.teacher_forced import session_logits_fn

    folder = per_channel_head if scheme == "per-channel" else quantized(scheme, **kw)[0]
    ids = np.random.default_rng(2).integers(0, 128, (2, 11)).astype(np.int64)
    logits = {}
    for name, path in (("rescored", folder), ("float head", _float_head_copy(folder, tmp_path / "fh"))):
        session = open_session(resolve_artifact(path), "onnxruntime", threads=1)  # accuracy level 4
        try:
            k = session.describe()["fused_ops_rewrite"][
                "int8 lm head: top-k logits per position recomputed with fp32 activations (k)"]
            assert k == (RESCORE_K if name == "rescored" else 0), (name, k)
            logits[name] = session_logits_fn(session)(ids)
        finally:
            session.close()
    got, want = logits["rescored"], logits["float head"]
    err = np.abs(got - want)
    top = np.argsort(want, axis=-1)[..., -4:]
    assert np.take_along_axis(err, top, -1).max() < 1e-4, np.take_along_axis(err, top, -1).max()
    assert err.max() > 1e-3, err.max()  # the logits outside the top k: the kernel's int8 activations
    assert (got.argmax(-1) == want.argmax(-1)).all()


@pytest.mark.parametrize("scheme, kw", [("int8-weight", {}), ("int4-rtn", {"group_size": 32}), ("per-channel", {})])
def test_int8_head_tensors_are_gathered_by_rows(quantized, per_channel_head, tmp_path, monkeypatch, scheme, kw):
    """The tied int8 table [H, V] (and its block scales [H/g, V]) are read by the embedding and
    the head rescoring as columns; the session graph reads rows of one transposed copy instead
    (ONNX Runtime copies a column element by element) and drops the export's tensor from its
    Gathers. The logits are bit for bit those of the session graph without this rewrite."""
    from llama_trt.runtime import open_session, resolve_artifact
    from llama_trt.runtime.sessions import ort_lowering
    from llama_trt.validate.teacher_forced import session_logits_fn

    folder = per_channel_head if scheme == "per-channel" else quantized(scheme, **kw)[0]
    ids = np.random.default_rng(4).integers(0, 128, (2, 9)).astype(np.int64)
    key = "column gathers from the quantized head's tensors read rows of a transposed copy"

    def logits(tag):
        session = open_session(resolve_artifact(folder), "onnxruntime", threads=1, cache_dir=tmp_path / tag)
        try:
            return session, session.describe()["fused_ops_rewrite"][key], session_logits_fn(session)(ids)
        finally:
            session.close()

    session, rewritten, got = logits("rows")
    # embedding + rescoring, each its integers and (blocked only) its scales
    assert rewritten == (2 if scheme == "per-channel" else 4), rewritten
    graph = onnx.ModelProto.FromString(session.graph.model_bytes).graph
    dims = {t.name: list(t.dims) for t in graph.initializer}
    vocab = 128
    table_gathers = [n for n in graph.node if n.op_type == "Gather" and n.input[0] in dims and vocab in dims[n.input[0]]]
    assert table_gathers and all(dims[n.input[0]][0] == vocab for n in table_gathers), table_gathers
    assert all(n.attribute[0].i == 0 for n in table_gathers)

    monkeypatch.setattr(ort_lowering, "transposed_gathers", lambda model, weights_dir: 0)
    _, none, want = logits("columns")
    assert none == 0
    np.testing.assert_array_equal(got, want)
