"""`llama-trt package ENGINE --triton OUT`: configs parse with Triton's own protobuf schema; model.py runs."""

from __future__ import annotations

import json
import queue
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from llama_trt.cli import main


def _engine_dir(tmp: Path, tiny_export: Path) -> Path:
    """A fake engine folder whose manifest follows trt_engines.manifest.EngineManifest (no GPU here)."""
    from llama_trt.trt_engines.manifest import EngineManifest
    from llama_trt.trt_engines.profiles import ProfileSpec

    export_m = json.loads((tiny_export / "manifest.json").read_text())
    cfg = export_m["config"]
    kv, hd, layers = cfg["num_kv_heads"], cfg["head_dim"], cfg["num_layers"]
    inputs = [{"name": "input_ids", "dtype": "int64", "shape": [-1, -1]},
              {"name": "attention_mask", "dtype": "int64", "shape": [-1, -1]},
              {"name": "position_ids", "dtype": "int64", "shape": [-1, -1]}]
    outputs = [{"name": "logits", "dtype": "float", "shape": [-1, -1, cfg["vocab_size"]]}]
    for i in range(layers):
        for kind in ("key", "value"):
            inputs.append({"name": f"past_key_values.{i}.{kind}", "dtype": "half", "shape": [-1, kv, -1, hd]})
            outputs.append({"name": f"present.{i}.{kind}", "dtype": "half", "shape": [-1, kv, -1, hd]})
    m = EngineManifest(
        backend="tensorrt_rtx", backend_version="1.2", targets=("89",), precision="fp16",
        limits={"max_batch": 4, "max_seq": 128, "max_context": 256},
        profiles=(ProfileSpec("prefill", 0, (1, 1, 0), (1, 64, 0), (4, 128, 0)),
                  ProfileSpec("decode", 1, (1, 1, 0), (1, 1, 128), (4, 1, 255))),
        op_routing=(), config=cfg, source={"path": str(tiny_export), "manifest": export_m},
        io={"inputs": inputs, "outputs": outputs}, tokenizer_files=("tokenizer.json", "tokenizer_config.json"))
    d = tmp / "engine"
    d.mkdir()
    (d / "manifest.json").write_text(m.to_json())
    (d / "model.plan").write_bytes(b"not a real plan")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (d / f).write_bytes((tiny_export / f).read_bytes())
    return d


def _parse(path: Path):
    pytest.importorskip("tritonclient.grpc", reason="pip install tritonclient[grpc] for Triton's model_config")
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_package_writes_a_parseable_triton_repository(tmp_path, tiny_export):
    eng = _engine_dir(tmp_path, tiny_export)
    out = tmp_path / "repo"
    res = CliRunner().invoke(main, ["package", str(eng), "--triton", str(out), "--model-name", "tiny"])
    assert res.exit_code == 0, res.output
    from tritonclient.grpc import model_config_pb2 as pb

    cfg = _parse(out / "tiny" / "config.pbtxt")
    assert cfg.name == "tiny" and cfg.platform == "tensorrt_plan" and cfg.max_batch_size == 0
    io = json.loads((eng / "manifest.json").read_text())["io"]
    assert [i.name for i in cfg.input] == [t["name"] for t in io["inputs"]]
    assert [o.name for o in cfg.output] == [t["name"] for t in io["outputs"]]
    by = {t.name: t for t in (*cfg.input, *cfg.output)}
    assert list(by["input_ids"].dims) == [-1, -1] and by["input_ids"].data_type == pb.TYPE_INT64
    assert by["past_key_values.0.key"].data_type == pb.TYPE_FP16 and list(by["past_key_values.0.key"].dims)[0] == -1
    assert by["logits"].data_type == pb.TYPE_FP32 and by["logits"].dims[-1] == 256
    assert cfg.instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU
    assert list(cfg.instance_group[0].profile) == ["0", "1"]
    assert (out / "tiny" / "1" / "model.plan").read_bytes() == b"not a real plan"
    assert json.loads((out / "tiny" / "1" / "manifest.json").read_text())["kind"] == "engine"

    gen = _parse(out / "tiny_generate" / "config.pbtxt")
    assert gen.backend == "python" and gen.model_transaction_policy.decoupled
    assert {i.name for i in gen.input} >= {"text_input", "max_tokens", "temperature", "stop", "stream"}
    assert gen.parameters["artifact_dir"].string_value == "../../tiny/1"
    assert gen.instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU
    assert (out / "tiny_generate" / "1" / "model.py").is_file()

    # refusing to overwrite; --force replaces
    again = CliRunner().invoke(main, ["package", str(eng), "--triton", str(out), "--model-name", "tiny"])
    assert again.exit_code == 2 and "--force" in again.output
    assert CliRunner().invoke(main, ["package", str(eng), "--triton", str(out), "--model-name", "tiny",
                                     "--force"]).exit_code == 0


def test_package_refuses_what_is_neither_engine_nor_export(tmp_path, tiny_export):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "manifest.json").write_text(json.dumps({"kind": "llama_trt.checkpoint"}))
    res = CliRunner().invoke(main, ["package", str(ckpt), "--triton", str(tmp_path / "r")])
    assert res.exit_code == 2 and "neither an engine" in res.output
    res = CliRunner().invoke(main, ["package", str(tmp_path / "nothing"), "--triton", str(tmp_path / "r")])
    assert res.exit_code == 2 and res.output.startswith("error:")
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


def test_package_an_onnx_export(tmp_path, tiny_export):
    """An export gets one python model (KIND_CPU, ONNX Runtime) with the export copied into it,
    and `package` prints a tritonserver command that loads exactly that model."""
    out = tmp_path / "repo"
    res = CliRunner().invoke(main, ["package", str(tiny_export), "--triton", str(out), "--model-name", "tiny",
                                    "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["tiny_generate"]  # nothing half-written left beside
    from tritonclient.grpc import model_config_pb2 as pb

    gen = _parse(out / "tiny_generate" / "config.pbtxt")
    assert gen.backend == "python" and gen.model_transaction_policy.decoupled
    assert gen.instance_group[0].kind == pb.ModelInstanceGroup.KIND_CPU
    assert gen.parameters["artifact_dir"].string_value == "artifact"
    assert gen.parameters["backend"].string_value == "onnxruntime"
    assert gen.parameters["threads"].string_value == "1"
    names = {i.name: i for i in gen.input}
    assert {"text_input", "input_ids", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
            "stream", "chat"} <= set(names) and all(i.optional for i in gen.input)
    assert names["input_ids"].data_type == pb.TYPE_INT64 and list(names["input_ids"].dims) == [-1]
    art = out / "tiny_generate" / "1" / "artifact"
    for f in ("model.onnx", "manifest.json", "tokenizer.json", "tokenizer_config.json"):
        assert (art / f).read_bytes() == (tiny_export / f).read_bytes()
    assert (out / "tiny_generate" / "1" / "model.py").is_file()
    assert "--load-model=tiny_generate" in res.output and "--model-control-mode=explicit" in res.output
    assert f"--model-repository={out.resolve()}" in res.output
    # a model folder that is the artifact itself is refused (with --force too), never deleted
    import shutil

    src = tmp_path / "repo2" / "x_generate"
    shutil.copytree(tiny_export, src)
    res = CliRunner().invoke(main, ["package", str(src), "--triton", str(src.parent), "--model-name", "x", "--force"])
    assert res.exit_code == 2 and "being packaged" in res.output and (src / "model.onnx").is_file()


class _FakePb(types.ModuleType):
    """Just enough of triton_python_backend_utils to drive model.py in-process."""

    TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1

    class Tensor:
        def __init__(self, name, array):
            self.name, self._a = name, array

        def as_numpy(self):
            return self._a

    class InferenceResponse:
        def __init__(self, output_tensors=None, error=None):
            self.outputs = {t.name: t.as_numpy() for t in output_tensors or []}
            self.error = error

    class TritonError(Exception):
        INVALID_ARG, UNAVAILABLE, INTERNAL = "INVALID_ARG", "UNAVAILABLE", "INTERNAL"

        def __init__(self, message, code=None):
            super().__init__(message)
            self.code = code

    @staticmethod
    def get_input_tensor_by_name(request, name):
        return request.inputs.get(name)


class _Sender:
    def __init__(self):
        self.q = queue.Queue()

    def send(self, response, flags=0):
        self.q.put((response, flags))


class _Request:
    def __init__(self, **inputs):
        self.inputs = {k: _FakePb.Tensor(k, v) for k, v in inputs.items()}
        self.sender = _Sender()

    def get_response_sender(self):
        return self.sender


def test_python_generate_model_matches_run(tmp_path, tiny_export, run_cli, monkeypatch):
    """model.py over our runtime (ONNX Runtime here instead of the engine): same text as `llama-trt run`."""
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _FakePb("triton_python_backend_utils"))
    import importlib

    import llama_trt.serve.triton_model as tm

    tm = importlib.reload(tm)
    model = tm.TritonPythonModel()
    cfg = {"name": "tiny_generate", "parameters": {"artifact_dir": {"string_value": str(tiny_export)},
                                                     "backend": {"string_value": "onnxruntime"}}}
    model.initialize({"model_config": json.dumps(cfg), "model_repository": str(tmp_path), "model_version": "1"})
    try:
        prompt = "once upon a time"
        ref = run_cli("--prompt", prompt, "--max-new-tokens", "10")
        for stream in (True, False):
            req = _Request(text_input=np.array([prompt.encode()], dtype=object), max_tokens=np.array([10], np.int32),
                           temperature=np.array([0.0], np.float32), stream=np.array([stream]))
            model.execute([req])
            texts, ids, flags = [], [], 0
            while not flags:
                resp, flags = req.sender.q.get(timeout=30)
                assert resp.error is None, resp.error
                texts.append(resp.outputs["text_output"][0].decode())
                ids += resp.outputs["output_ids"].tolist()
            assert "".join(texts) == ref["text"] and ids == ref["token_ids"]
            assert resp.outputs["finish_reason"][0] == b"length"
            assert int(resp.outputs["completion_tokens"][0]) == 10
            assert len(texts) > 1 if stream else len(texts) == 1
        # backpressure: with one slot, execute() returns only once the scheduler took the second
        # request, i.e. after the first one finished; meanwhile Triton queues what comes next
        one_slot = tm.TritonPythonModel()
        cfg1 = dict(cfg, parameters=dict(cfg["parameters"], max_batch={"string_value": "1"}))
        one_slot.initialize({"model_config": json.dumps(cfg1), "model_repository": str(tmp_path), "model_version": "1"})
        try:
            reqs = [_Request(text_input=np.array([prompt.encode()], dtype=object), ignore_eos=np.array([True]),
                             max_tokens=np.array([200], np.int32)) for _ in range(2)]  # 200 steps: not instant
            one_slot.execute(reqs)
            # its final response is on its way (its responder thread may send it a moment after the
            # slot freed); without backpressure it would still be 200 steps away
            assert reqs[0].sender.q.get(timeout=0.1)[1] == 1
            assert reqs[1].sender.q.get(timeout=30)[1] == 1
        finally:
            one_slot.finalize()
        bad = _Request(text_input=np.array([b"a"], dtype=object), max_tokens=np.array([10_000], np.int32))
        model.execute([bad])
        resp, flags = bad.sender.q.get(timeout=30)
        assert resp.error is not None and flags == 1 and resp.error.code == "INVALID_ARG"
    finally:
        model.finalize()
