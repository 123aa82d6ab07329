"""`load_skeleton`: the graph without its weights. Every big initializer becomes an external-data
reference whose bytes, read back by onnx's own loader, equal the tensor ``onnx.load`` sees;
small ones stay inline; initializers already in a data file keep their reference."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import load_external_data_for_model, uses_external_data

from llama_trt.runtime.sessions.onnx_skeleton import load_skeleton


def _model():
    rng = np.random.default_rng(0)
    arrays = {"big_f32": rng.standard_normal((64, 96)).astype(np.float32),
              "big_i8": rng.integers(-127, 128, (300, 70), dtype=np.int8),
              "big_f16": rng.standard_normal((50, 50)).astype(np.float16),
              "small": np.arange(5, dtype=np.int64)}
    inits = [numpy_helper.from_array(a, n) for n, a in arrays.items()]
    nodes = [helper.make_node("Identity", [n], [n + "_out"]) for n in arrays]
    g = helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info(n + "_out", TensorProto.UNDEFINED, None)
                                         for n in arrays], initializer=inits)
    g.doc_string = "kept"
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)], producer_name="test"), arrays


def _check(path, arrays, inline_max=1024):
    sk = load_skeleton(path, inline_max)
    assert sk.producer_name == "test" and sk.graph.doc_string == "kept" and len(sk.graph.node) == len(arrays)
    ext = {t.name for t in sk.graph.initializer if uses_external_data(t)}
    assert ext == {n for n, a in arrays.items() if a.nbytes > inline_max}
    assert sk.ByteSize() < sum(a.nbytes for a in arrays.values()) / 4
    load_external_data_for_model(sk, str(path.parent))
    got = {t.name: numpy_helper.to_array(t) for t in sk.graph.initializer}
    ref = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    assert got.keys() == ref.keys() == arrays.keys()
    for n, a in arrays.items():
        np.testing.assert_array_equal(got[n], a)
        assert got[n].dtype == a.dtype


def test_inline_weights_become_references_into_the_model_file(tmp_path):
    model, arrays = _model()
    onnx.save(model, str(tmp_path / "model.onnx"))
    _check(tmp_path / "model.onnx", arrays)


def test_weights_already_in_a_data_file_keep_their_reference(tmp_path):
    model, arrays = _model()
    onnx.save(model, str(tmp_path / "model.onnx"), save_as_external_data=True, location="model.onnx.data",
              size_threshold=1024)
    _check(tmp_path / "model.onnx", arrays)
    locations = {e.value for t in load_skeleton(tmp_path / "model.onnx", 1024).graph.initializer
                 for e in t.external_data if e.key == "location"}
    assert locations == {"model.onnx.data"}


def test_cache_key_follows_the_export(tmp_path):
    """The cached rewrite is keyed on the export: the same files give the same key; a rewritten
    model file, another rope context or the rewrite switched off give another."""
    import os
    import time

    from llama_trt.runtime.sessions.ort_cache import cache_key

    model, _ = _model()
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    key = cache_key(path, 128, True)
    assert cache_key(path, 128, True) == key
    assert cache_key(path, 256, True) != key and cache_key(path, 128, False) != key
    model.graph.doc_string = "changed"
    onnx.save(model, str(path))
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + int(time.time())))
    assert cache_key(path, 128, True) != key


def test_a_model_serialized_in_parts_parses_back_whole():
    """The parts' concatenation is one valid encoding: onnx's parser (protobuf merging the graph
    message and appending initializers) gives the same model, and ONNX Runtime runs it."""
    import onnxruntime as ort

    from llama_trt.runtime.sessions.onnx_skeleton import serialize_in_parts

    model, arrays = _model()
    whole = model.SerializeToString()
    parts = serialize_in_parts(onnx.ModelProto.FromString(whole), big_bytes=2000)
    assert len(parts) == 1 + 2 * 3  # the rest, then a frame and a tensor for each of the 3 over 2000 bytes
    back = onnx.ModelProto.FromString(b"".join(parts))
    assert back.producer_name == "test" and back.graph.doc_string == "kept"
    assert list(back.graph.node) == list(model.graph.node) and list(back.graph.output) == list(model.graph.output)
    got = {t.name: numpy_helper.to_array(t) for t in back.graph.initializer}
    assert got.keys() == arrays.keys()
    for n, a in arrays.items():
        np.testing.assert_array_equal(got[n], a)
    for out, a in zip(back.graph.output, arrays.values()):  # typed outputs, as ONNX Runtime wants
        out.CopyFrom(helper.make_tensor_value_info(out.name, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape))
    parts = serialize_in_parts(back, big_bytes=2000)
    outs = ort.InferenceSession(b"".join(parts), providers=["CPUExecutionProvider"]).run(None, {})
    for out, a in zip(outs, arrays.values()):
        np.testing.assert_array_equal(out, a)
