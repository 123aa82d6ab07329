"""Fast unit tests: tolerance parsing/resolution, metrics, layer mapping, report JSON."""

from __future__ import annotations

import numpy as np
import pytest

from llama_trt.errors import ValidationError
from llama_trt.validate import default_tolerances, parse_tol, parse_tols
from llama_trt.validate import metrics as M
from llama_trt.validate.layerwise import points_for


def test_parse_tol_forms():
    assert parse_tol("logits=1e-3:2e-3") == ("logits", (1e-3, 2e-3))
    assert parse_tol("present.*=0.1") == ("present.*", (0.1, 0.1))
    assert parse_tol("default=1:2") == ("", (1.0, 2.0))
    assert parse_tol("kl=1e-4") == ("kl", 1e-4)
    for bad in ("logits", "logits=abc", "logits=1:2:3", "logits=-1"):
        with pytest.raises(ValidationError):
            parse_tol(bad)


def test_tolerance_resolution_exact_beats_glob_and_defaults_per_precision():
    fp32, fp16, int8 = (default_tolerances(p) for p in ("fp32", "fp16", "int8"))
    assert fp32.elementwise["logits"] == (1e-3, 1e-3) and fp16.elementwise["logits"] == (0.5, 0.5)
    assert fp32.metrics["kl"] < fp16.metrics["kl"] < int8.metrics["kl"]
    assert int8.metrics["top1"] <= 0.977  # llama.cpp q8_0 anchor is 97.7% on an 8B model
    tol = fp32.with_overrides(parse_tols(["present.*=1e-2", "present.0.key=5e-3:1e-4", "top1=0.5"]))
    atol, rtol = tol.resolve(["logits", "present.0.key", "present.1.value"])
    assert atol == {"": 1e-3, "logits": 1e-3, "present.0.key": 5e-3, "present.1.value": 1e-2}
    assert rtol["present.0.key"] == 1e-4
    assert tol.metrics["top1"] == 0.5 and default_tolerances("fp32").metrics["top1"] == 0.995
    typo = fp32.with_overrides(parse_tols(["logit=1", "present.*=1", "layerwise.*=1", "presnt.*=1"]))
    assert typo.unmatched(["logits", "present.0.key"]) == ["logit", "presnt.*"]


def test_certificate_gates_per_scheme():
    """The issue's targets are the defaults: int8-weight KL <= 0.004 & top-1 >= 96.5%, int8-sq
    KL <= 0.02; int4 schemes share one looser family; fp32 < fp16 < int8-weight < int8-sq < int4."""
    w8 = default_tolerances("int8", "int8-weight").metrics
    assert w8["kl"] == 0.004 and w8["top1"] == 0.965
    assert default_tolerances("int8", "int8-sq").metrics["kl"] == 0.02
    assert default_tolerances("int8", "int4-awq").metrics == default_tolerances("int8", "int4-rtn").metrics
    order = [default_tolerances(p, s).metrics for p, s in
             (("fp32", None), ("fp16", None), ("int8", "int8-weight"), ("int8", "int8-sq"), ("int8", "int4-awq"))]
    for name in ("kl", "kl_p99", "ppl_ratio"):
        assert [m[name] for m in order] == sorted(m[name] for m in order), name
    assert [m["top1"] for m in order] == sorted((m["top1"] for m in order), reverse=True)
    assert "greedy" not in order[0]


def test_metrics():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 32))
    assert np.allclose(M.kl_divergence(a, a), 0) and M.top1_matches(a, a).all()
    assert np.allclose(M.cosine_similarity(a, 2 * a), 1)
    b = a.copy()
    b[0, a[0].argmax()] -= 100
    assert M.kl_divergence(a, b)[0] > 0.01 and not M.top1_matches(a, b)[0]
    uniform = np.zeros((4, 8))
    assert M.perplexity(uniform, [1, 2, 3, 4]) == pytest.approx(8.0)
    assert M.greedy_agreement([1, 2, 3, 4], [1, 2, 9, 4]) == (0.75, 2)
    assert M.greedy_agreement([1, 2], [1, 2]) == (1.0, None)


def test_layer_points_follow_node_order_and_check_counts():
    io = [(f"x{k}", f"y{k}") for k in range(5)]  # 2 layers: 2 * 2 + 1 RMSNorm nodes
    pts = points_for(2, io)
    assert [p.name for p in pts] == [
        "embedding", "layers.0.input_layernorm", "layers.0.attn_residual", "layers.0.post_attention_layernorm",
        "layers.0.output", "layers.1.input_layernorm", "layers.1.attn_residual",
        "layers.1.post_attention_layernorm", "layers.1.output", "norm",
    ]
    assert [p.layer for p in pts] == [-1, 0, 0, 0, 0, 1, 1, 1, 1, 2]
    assert pts[4].onnx_tensor == "x2" and pts[4].which == "in" and pts[4].norm_call == 2
    with pytest.raises(ValidationError, match="cannot map"):
        points_for(3, io)
