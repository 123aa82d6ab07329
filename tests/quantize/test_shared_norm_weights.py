"""Scale folds on a model whose RMSNorm weights are equal: the export stores them once.

A checkpoint whose norm weights are all ones (a fresh transformers model, or one whose norms were
folded into the next layer) exports with one norm-weight tensor read by every RMSNorm node. AWQ
(int8-weight, int4-awq) and SmoothQuant (int8-sq) divide a norm's weight by its own scale; before
the fix that division reached every norm and the quantized SmolLM2 with folded norms scored KL
1448 against fp32. Both folds must leave the float model unchanged (logits before vs after,
ONNX Runtime on the same graph).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def ones_norm_export(tmp_path_factory):
    import torch
    from transformers import LlamaForCausalLM

    from llama_trt.exporter import export
    from tests.conftest import make_hf_checkpoint

    root = tmp_path_factory.mktemp("ones-norm")
    ckpt = make_hf_checkpoint(root / "ckpt", seed=5)
    model = LlamaForCausalLM.from_pretrained(ckpt)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
    model.save_pretrained(ckpt)
    out = root / "fp32"
    export(ckpt, out, dtype="fp32", ort_check=False)
    return ckpt, out


def _norm_weights(model) -> list[str]:
    return [n.input[1] for n in model.graph.node if n.domain == "llama_trt" and n.op_type == "RMSNorm"]


def _logits(model, manifest, ids):
    import onnxruntime as ort

    from llama_trt.exporter.feeds import build_feeds, split_outputs

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return split_outputs(manifest, sess.run(None, build_feeds(manifest, ids)))[0]


def _setup(ones_norm_export):
    from llama_trt.checkpoint import load_checkpoint
    from llama_trt.exporter import load_manifest
    from llama_trt.quantize.graph import analyse_graph

    ckpt, folder = ones_norm_export
    manifest = load_manifest(folder)
    model = onnx.load(str(folder / "model.onnx"))
    state = load_checkpoint(ckpt).state_dict
    info = analyse_graph(model, state)
    norms = _norm_weights(model)
    assert len(norms) == 5 and len(set(norms)) == 1  # the premise: one tensor for every norm
    ids = np.random.default_rng(0).integers(0, 128, (2, 10)).astype(np.int64)
    return manifest, model, state, info, ids


def test_awq_fold_reaches_only_its_own_norm(ones_norm_export):
    from llama_trt.exporter.manifest import load_manifest
    from llama_trt.quantize.awq import apply_awq
    from llama_trt.quantize.pipeline import _torch_model
    from llama_trt.quantize.stats import linear_inputs

    manifest, model, state, info, ids = _setup(ones_norm_export)
    before = _logits(model, manifest, ids)
    sites = [s for s in info.sites if s.name != "lm_head"]
    cfg = load_manifest(ones_norm_export[1]).config
    batches = [np.random.default_rng(1).integers(0, 128, (2, 16))]
    inputs = linear_inputs(_torch_model(cfg, state), batches, [s.name for s in sites])
    _, report = apply_awq(model, sites, inputs, 32, True, cfg)
    norm_folds = [k for k in report.vectors if k.endswith(("q_proj", "gate_proj"))]
    assert len(norm_folds) == 4  # input and post-attention norm of both layers took a scale
    assert len(set(_norm_weights(model))) == 5  # each folded norm now has its own tensor
    after = _logits(model, manifest, ids)
    assert np.abs(after - before).max() < 1e-4, np.abs(after - before).max()


def test_smoothquant_fold_reaches_only_its_own_norm(ones_norm_export):
    from llama_trt.quantize.smoothquant import smooth, smoothing_groups
    from llama_trt.quantize.stats import activation_absmax

    manifest, model, state, info, ids = _setup(ones_norm_export)
    before = _logits(model, manifest, ids)
    groups = smoothing_groups(model, info.sites)
    batches = [np.random.default_rng(1).integers(0, 128, (2, 16))]
    act = activation_absmax(model, manifest, batches, [g[1] for g in groups])
    stats = smooth(model, groups, act, 0.5)
    assert len(stats) == len(groups) == 5 and all(s["max"] > 1.5 * s["min"] for s in stats.values())
    assert len(set(_norm_weights(model))) == 5  # each smoothed norm now has its own tensor
    after = _logits(model, manifest, ids)
    assert np.abs(after - before).max() < 1e-4, np.abs(after - before).max()
