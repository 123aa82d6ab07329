"""Structure of the exported file: plugin nodes, functions, IO contract, dtypes, manifest."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from llama_trt.exporter.feeds import build_feeds, split_outputs

FORBIDDEN_OPS = {
    "DFT", "STFT", "Dropout", "Gradient", "Momentum", "Adagrad", "Adam",
    "SoftmaxCrossEntropyLoss", "NegativeLogLikelihoodLoss", "BatchNormalization",
}
COMPLEX = {TensorProto.COMPLEX64, TensorProto.COMPLEX128}


def load(exp) -> onnx.ModelProto:
    return onnx.load(str(exp.onnx_path))


def all_nodes(graph):
    for n in graph.node:
        yield n
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from all_nodes(a.g)


@pytest.mark.parametrize("name,dtype", [("gqa", "fp32"), ("gqa", "fp16"), ("stories260k", "fp32")])
def test_plugin_nodes_functions_and_checker(exported, name, dtype):
    exp = exported(name, dtype)
    model = load(exp)
    cfg = exp.manifest.llama_config
    L = cfg.num_layers
    ops = Counter((n.domain, n.op_type) for n in model.graph.node)
    assert ops[("llama_trt", "RMSNorm")] == 2 * L + 1
    assert ops[("llama_trt", "RotaryEmbedding")] == 2 * L
    assert {d for d, _ in ops} <= {"", "llama_trt"}
    assert not FORBIDDEN_OPS & {t for _, t in ops}
    assert {(f.domain, f.name) for f in model.functions} == {("llama_trt", "RMSNorm"), ("llama_trt", "RotaryEmbedding")}
    assert {o.domain: o.version for o in model.opset_import} == {"": 23, "llama_trt": 1}
    inits = {i.name: i for i in model.graph.initializer}
    assert not any(i.data_type in COMPLEX for i in inits.values())
    for n in model.graph.node:
        attrs = {a.name: a for a in n.attribute}
        if n.op_type == "RMSNorm":
            assert attrs["epsilon"].type == onnx.AttributeProto.FLOAT
            assert attrs["epsilon"].f == pytest.approx(cfg.rms_norm_eps)
        if n.op_type == "RotaryEmbedding":
            assert attrs["interleaved"].type == attrs["rotary_dim"].type == onnx.AttributeProto.INT
            assert attrs["interleaved"].i == int(cfg.rope_interleaved)
            assert attrs["rotary_dim"].i == cfg.rotary_dim
            assert n.input[1] == "position_ids"
            inv = inits[n.input[2]]
            assert inv.data_type == TensorProto.FLOAT  # float32 even in the fp16 export
            expected = np.array(cfg.inv_freq(), dtype=np.float64).astype(np.float32)
            np.testing.assert_array_equal(numpy_helper.to_array(inv), expected)
    onnx.checker.check_model(str(exp.onnx_path), full_check=True)


def test_file_is_self_contained(exported):
    """A fresh process with no llama_trt schemas registered can check and run the file."""
    exp = exported("gqa", "fp32")
    code = (
        "import sys, onnx, numpy as np, onnxruntime as ort\n"
        "p = sys.argv[1]\n"
        "onnx.checker.check_model(p, full_check=True)\n"
        "s = ort.InferenceSession(p, providers=['CPUExecutionProvider'])\n"
        "feeds = {i.name: (np.ones([2, 3], np.int64) if i.type == 'tensor(int64)' else np.zeros([2, 2, 0, 16], np.float32)) for i in s.get_inputs()}\n"
        "print(s.run(['logits'], feeds)[0].shape)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(exp.onnx_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "(2, 3, 256)" in out.stdout


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_io_contract(exported, dtype):
    exp = exported("gqa", dtype)
    model = load(exp)
    m = exp.manifest
    cfg = m.llama_config
    kv = TensorProto.FLOAT16 if dtype == "fp16" else TensorProto.FLOAT

    def sig(values):
        return {
            v.name: (v.type.tensor_type.elem_type,
                     [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
            for v in values
        }

    inputs, outputs = sig(model.graph.input), sig(model.graph.output)
    assert list(inputs)[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert inputs["input_ids"] == (TensorProto.INT64, ["batch", "seq"])
    assert inputs["attention_mask"] == (TensorProto.INT64, ["batch", "total_seq"])
    assert inputs["position_ids"] == (TensorProto.INT64, ["batch", "seq"])
    assert outputs["logits"] == (TensorProto.FLOAT, ["batch", "seq", cfg.vocab_size])
    for i in range(cfg.num_layers):
        for kind in ("key", "value"):
            assert inputs[f"past_key_values.{i}.{kind}"] == (kv, ["batch", cfg.num_kv_heads, "past", cfg.head_dim])
            assert outputs[f"present.{i}.{kind}"] == (kv, ["batch", cfg.num_kv_heads, "total_seq", cfg.head_dim])
    assert len(inputs) == 3 + 2 * cfg.num_layers and len(outputs) == 1 + 2 * cfg.num_layers
    # the manifest records the same contract
    assert m.input_names == [v.name for v in model.graph.input]
    assert m.output_names == [v.name for v in model.graph.output]
    assert m.dynamic_axes()["attention_mask"] == {0: "batch", 1: "total_seq"}
    assert m.dynamic_axes()["past_key_values.0.key"] == {0: "batch", 2: "past"}


def test_fp16_weights_fp16_but_stats_softmax_angles_fp32(exported):
    exp = exported("gqa", "fp16")
    model = load(exp)
    inits = {i.name: i.data_type for i in model.graph.initializer if len(i.dims) >= 1}
    floats = {k: t for k, t in inits.items() if t in (TensorProto.FLOAT, TensorProto.FLOAT16)}
    assert {k for k, t in floats.items() if t == TensorProto.FLOAT} == {"model.rotary_emb.inv_freq"}
    # the optimizer folds W.T of each Linear into an unnamed initializer: count the matrices
    matrices = [i for i in model.graph.initializer if len(i.dims) == 2]
    assert len(matrices) == 7 * exp.manifest.num_layers + 2  # q k v o gate up down, embed, lm_head
    assert {i.data_type for i in matrices} == {TensorProto.FLOAT16}
    assert inits["model.rotary_emb.inv_freq"] == TensorProto.FLOAT
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in (*inferred.graph.value_info, *inferred.graph.input)}
    softmax_inputs = [n.input[0] for n in model.graph.node if n.op_type == "Softmax"]
    assert len(softmax_inputs) == exp.manifest.num_layers
    assert {types[i] for i in softmax_inputs} == {TensorProto.FLOAT}
    # RMSNorm statistics: the function body casts its input to float32 before squaring
    rms = next(f for f in model.functions if f.name == "RMSNorm")
    first = rms.node[0]
    assert first.op_type == "Cast" and first.attribute[0].i == TensorProto.FLOAT and first.input[0] == "X"
    assert rms.node[1].op_type == "Mul" and list(rms.node[1].input) == [first.output[0]] * 2


def test_changing_plugin_attributes_changes_results(exported, tmp_path):
    """The attributes drive the function bodies (what a validator tampering with them relies on)."""
    exp = exported("gqa", "fp32")
    m = exp.manifest
    ids = np.array([[1, 7, 9, 4, 3, 5]], np.int64)

    def logits_with(edit, half_inv_freq=False):
        model = load(exp)
        for n in model.graph.node:
            edit(n)
        if half_inv_freq:  # rotary_dim 8 needs inv_freq of length 4
            init = next(i for i in model.graph.initializer if i.name == "model.rotary_emb.inv_freq")
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init)[:4].copy(), init.name))
        path = tmp_path / "edited.onnx"
        onnx.save(model, str(path))
        from llama_trt.exporter.feeds import ort_session

        return split_outputs(m, ort_session(path).run(None, build_feeds(m, ids)))[0]

    def set_attr(op_type, name, value):
        def edit(n):
            if n.op_type == op_type:
                for a in n.attribute:
                    if a.name == name:
                        if a.type == onnx.AttributeProto.INT:
                            a.i = value
                        else:
                            a.f = value
        return edit

    base = logits_with(lambda n: None)
    ref = split_outputs(m, exp.session().run(None, build_feeds(m, ids)))[0]
    np.testing.assert_array_equal(base, ref)
    for op_type, name, value in [("RotaryEmbedding", "interleaved", 1), ("RotaryEmbedding", "rotary_dim", 8),
                                 ("RMSNorm", "epsilon", 0.5)]:
        changed = logits_with(set_attr(op_type, name, value), half_inv_freq=name == "rotary_dim")
        assert np.abs(changed - base).max() > 1e-3, f"{op_type}.{name} has no effect"


def test_manifest_contents(exported):
    from llama_trt.checkpoint import load_checkpoint

    exp = exported("gqa", "fp32")
    m = exp.manifest
    ckpt = load_checkpoint(exp.checkpoint)
    assert m.source_sha256 == ckpt.fingerprint()
    assert m.source_format == "hf"
    assert m.llama_config == ckpt.config
    assert (m.dtype, m.opset, m.external_data, m.model_file) == ("fp32", 23, None, "model.onnx")
    assert {p.op_type: p.count for p in m.plugin_ops} == {"RMSNorm": 5, "RotaryEmbedding": 4}
    assert {p.op_type: p.attributes for p in m.plugin_ops} == {
        "RMSNorm": {"epsilon": "float"}, "RotaryEmbedding": {"interleaved": "int", "rotary_dim": "int"}}
    for tool in ("torch", "onnx", "onnxscript", "onnxruntime", "llama-trt"):
        assert m.tool_versions[tool]
    assert m.model_bytes == exp.onnx_path.stat().st_size
    assert sorted(p.name for p in exp.out_dir.iterdir()) == ["manifest.json", "model.onnx"]


def test_tokenizer_files_are_copied(tmp_path, checkpoints, exported, monkeypatch):
    """Tokenizer files of the checkpoint land beside model.onnx.

    Tracing is replaced by loading an earlier export (it is tested elsewhere) to keep this quick.
    """
    import shutil

    import onnx_ir

    from llama_trt.exporter import core, export, load_manifest

    done = exported("gqa", "fp32")
    ck = tmp_path / "ck"
    shutil.copytree(checkpoints("gqa"), ck)
    (ck / "tokenizer.json").write_text('{"version": "1.0"}')
    (ck / "tokenizer_config.json").write_text("{}")
    monkeypatch.setattr(core, "trace_to_onnx", lambda model, opset: onnx_ir.load(done.onnx_path))
    m = export(ck, tmp_path / "out")
    assert set(m.tokenizer_files) == {"tokenizer.json", "tokenizer_config.json"}
    assert (tmp_path / "out" / "tokenizer.json").read_text() == '{"version": "1.0"}'
    assert load_manifest(tmp_path / "out").tokenizer_files == m.tokenizer_files


def test_large_weights_go_to_external_data(tmp_path, checkpoints, exported, monkeypatch):
    """Above the 2 GB threshold (lowered here) weights are written as model.onnx.data beside the file."""
    import onnx_ir

    from llama_trt.exporter import core, export, load_manifest
    from llama_trt.exporter.feeds import ort_session

    done = exported("gqa", "fp32")
    monkeypatch.setattr(core, "trace_to_onnx", lambda model, opset: onnx_ir.load(done.onnx_path))
    monkeypatch.setattr(core, "EXTERNAL_DATA_THRESHOLD", 1 << 10)
    out = tmp_path / "out"
    m = export(checkpoints("gqa"), out)  # includes the checker and the ORT prefill/decode run
    assert m.external_data == "model.onnx.data"
    assert (out / "model.onnx.data").stat().st_size > (out / "model.onnx").stat().st_size
    assert m.model_bytes == sum(p.stat().st_size for p in out.iterdir() if p.name.startswith("model.onnx"))
    assert load_manifest(out).external_data == "model.onnx.data"
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    man = load_manifest(out)
    ids = np.array([[1, 7, 9]], np.int64)
    got = split_outputs(man, ort_session(out).run(None, build_feeds(man, ids)))[0]
    want = split_outputs(man, done.session().run(None, build_feeds(man, ids)))[0]
    np.testing.assert_array_equal(got, want)
