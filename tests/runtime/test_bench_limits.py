"""`bench`'s decode limit: bytes per token counted from the graph at stored sizes (int8 as int8,
an embedding table one row, a tied table whole and once, RoPE caches one row), and a read
bandwidth probe that includes ONNX Runtime's GEMV over a prepacked weight (the form a decode
step streams its weights in)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from llama_trt.runtime.bench import last_level_cache_bytes, measure_bandwidth
from llama_trt.runtime.read_bytes import graph_reads

V, H, N, CTX = 1000, 64, 96, 512


def _model(tied: bool):
    rng = np.random.default_rng(0)
    embed = rng.standard_normal((V, H)).astype(np.float32)
    w8 = rng.integers(-127, 128, (H, N), dtype=np.int8)
    scale = np.full((N,), 0.01, dtype=np.float32)
    w_down = rng.standard_normal((N, H)).astype(np.float16)
    cos = np.ones((CTX, H // 4), dtype=np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in
             ((embed, "embed"), (w8, "w8"), (scale, "scale"), (w_down, "w_down"), (cos, "cos"), (cos, "sin"))]
    nodes = [
        helper.make_node("Gather", ["embed", "ids"], ["x"]),
        helper.make_node("DequantizeLinear", ["w8", "scale"], ["w"], axis=1),
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Cast", ["w_down"], ["w_down32"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["h", "w_down32"], ["y0"]),
        helper.make_node("RotaryEmbedding", ["y0", "cos", "sin", "pos"], ["y"], num_heads=2),
    ]
    if tied:
        nodes += [helper.make_node("Transpose", ["embed"], ["embed_t"], perm=[1, 0]),
                  helper.make_node("MatMul", ["y", "embed_t"], ["logits"])]
    else:
        inits.append(numpy_helper.from_array(np.zeros((H, V), dtype=np.float32), "head"))
        nodes.append(helper.make_node("MatMul", ["y", "head"], ["logits"]))
    inits.append(numpy_helper.from_array(np.zeros((7,), dtype=np.float32), "unused"))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 1]),
                                       helper.make_tensor_value_info("pos", TensorProto.INT64, [1, 1])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)], initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)])


@pytest.mark.parametrize("tied", [False, True])
def test_bytes_per_token_counted_from_the_graph(tied):
    reads = graph_reads(_model(tied))
    # by hand: int8 weight at 1 B/element + fp32 scales, fp16 weight at 2 B, one row of each
    # RoPE cache, the head whole; the table one row (untied) or whole, once (tied)
    expected = H * N * 1 + N * 4 + N * H * 2 + 2 * (H // 4) * 4
    expected += V * H * 4 if tied else H * 4 + H * V * 4
    assert reads.weight_bytes_per_token == expected
    assert set(reads.row_read_tensors) == ({"cos", "sin"} if tied else {"embed", "cos", "sin"})
    stored = V * H * 4 + H * N + N * 4 + N * H * 2 + 2 * CTX * (H // 4) * 4 + 7 * 4 + (0 if tied else H * V * 4)
    assert reads.stored_weight_bytes == stored


def test_bandwidth_probe_uses_threads_and_a_buffer_beyond_the_cache():
    bw = measure_bandwidth(0.01, repeats=2, threads=2)
    assert bw.threads == 2 and bw.buffer_bytes >= 4 * last_level_cache_bytes()
    assert bw.best_gb_s >= bw.median_gb_s > 0


def test_the_limit_covers_ort_gemv_over_a_prepacked_weight(monkeypatch):
    """A decode step is ONNX Runtime GEMVs over prepacked constant weights, which MLAS can stream
    faster than numpy reads a buffer; the limit is fraction_of_limit's denominator only if it
    takes that form's rate too: a GEMV over a constant of 4x the cache, with the session's
    threads, whose rate becomes the limit when it is the fastest. (Whether a real model stays
    under it is a timing, so it lives in `llama-trt bench`'s output and benchmarks/RESULTS.md.)"""
    from llama_trt.runtime import bench

    calls = []

    def fake(w, repeats, threads, *, constant):
        calls.append({"bytes": w.nbytes, "threads": threads, "constant": constant, "repeats": repeats})
        return [1e6 if constant else 1.0] * repeats

    monkeypatch.setattr(bench, "_gemv_rates", fake)
    bw = measure_bandwidth(0, repeats=2, threads=2)
    assert bw.best_gb_s == 1e6
    constant = [c for c in calls if c["constant"]]
    assert constant and constant[0]["bytes"] >= 4 * last_level_cache_bytes(), calls
    assert all(c["threads"] == 2 and c["repeats"] == 2 for c in calls)


def test_the_gemv_probe_times_a_real_session():
    from llama_trt.runtime.bench import _gemv_rates

    w = np.full((256, 512), 0.5, dtype=np.float32)
    for constant in (False, True):
        rates = _gemv_rates(w, 3, 2, constant=constant)
        assert len(rates) == 3 and all(r > 0 for r in rates)
