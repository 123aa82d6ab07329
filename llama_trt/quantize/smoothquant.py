"""INT8 SmoothQuant (W8A8, Xiao et al. 2023), its per-layer damage, and the refusal.

1. Smoothing (our code): per input channel j of the linears that follow an RMSNorm
   (q/k/v after ``input_layernorm``, gate/up after ``post_attention_layernorm``),
   ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` with ``max|X_j|`` from calibration and
   ``max|W_j|`` over the input row j of all the consumers' weights; the RMSNorm weight is
   divided by ``s`` and the consumers' weight rows multiplied by ``s`` (exact in real
   arithmetic). o_proj and down_proj have no preceding norm and are left unsmoothed.
2. Q/DQ insertion and calibration (ONNX Runtime ``quantize_static``, QDQ format): per-tensor
   symmetric int8 activations on the MatMul inputs (MinMax), per-channel symmetric int8
   weights on axis 1, no output quantization. Attention q.k^T / p.v and the KV cache stay fp32.
3. Damage (:func:`layer_damage`): the relative output error of each layer under W8A8 on the
   calibration activations, ``||x W - Q(x) Q(W)|| / ||x W||``. When the model misses its KL
   target, the most damaged layers are kept W8A16 (int8 weights, float activations) and the
   KL measured again; still above target -> :class:`ExportError` (nothing written) naming the
   KL and the schemes that hold (int8-weight, int4-awq).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

import numpy as np

from .graph import LinearSite, _init_array, _replace_init, private_initializer


def smoothing_groups(model, sites: list[LinearSite]) -> list[tuple[str, str, list[LinearSite]]]:
    """(RMSNorm weight initializer, its output, consumer sites) for norms feeding only linear sites."""
    by_input: dict[str, list[LinearSite]] = {}
    for s in sites:
        by_input.setdefault(s.input, []).append(s)
    groups = []
    for node in model.graph.node:
        if node.domain != "llama_trt" or node.op_type != "RMSNorm":
            continue
        y = node.output[0]
        consumers = [n for n in model.graph.node if y in n.input]
        mine = by_input.get(y, [])
        if mine and len(consumers) == len(mine) and all(n.op_type == "MatMul" for n in consumers):
            groups.append((node.input[1], y, mine))
    return groups


def smooth(model, groups, act_max: dict[str, np.ndarray], alpha: float) -> dict[str, dict[str, float]]:
    """SmoothQuant in place: norm weight / s, consumer weight rows * s. Returns per-norm s statistics."""
    graph = model.graph
    stats = {}
    for norm_w, y, consumers in groups:
        ws = [_init_array(graph, c.weight) for c in consumers]
        wmax = np.maximum(np.max(np.stack([np.abs(w).max(axis=1) for w in ws]), axis=0), 1e-5)
        amax = act_max[y].astype(np.float64)
        s = np.where(amax > 0, np.power(amax, alpha) / np.power(wmax.astype(np.float64), 1 - alpha), 1.0)
        s = np.maximum(s, 1e-5).astype(np.float32)
        norm = next(n for n in graph.node if y in n.output)
        own = private_initializer(graph, norm_w, norm)  # another norm may share the tensor
        _replace_init(graph, own, (_init_array(graph, own) / s).astype(np.float32))
        for c, w in zip(consumers, ws):
            _replace_init(graph, c.weight, (w * s[:, None]).astype(np.float32))
        stats[own] = {"min": float(s.min()), "max": float(s.max()), "mean": float(s.mean())}
    return stats


@contextlib.contextmanager
def _quiet():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def ort_quantize_w8a8(in_path: Path, out_path: Path, manifest, batches, nodes: list[str], exclude: list[str],
                      on_batch=None, external_data: bool = False) -> None:
    """ONNX Runtime quantize_static: QDQ, int8 symmetric activations (per tensor) and weights (per channel, axis 1)."""
    from onnxruntime.quantization import (
        CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static,
    )

    from ..exporter.feeds import build_feeds

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(batches)

        def get_next(self):
            ids = next(self._it, None)
            if ids is None:
                return None
            if on_batch is not None:
                on_batch()
            return build_feeds(manifest, ids)

    with _quiet():
        quantize_static(
            str(in_path), str(out_path), Reader(),
            quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"], per_channel=True, reduce_range=False,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, nodes_to_quantize=list(nodes),
            nodes_to_exclude=list(exclude), calibrate_method=CalibrationMethod.MinMax,
            use_external_data_format=external_data,
            extra_options={
                "ActivationSymmetric": True, "WeightSymmetric": True,
                "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
                "OpTypesToExcludeOutputQuantization": ["MatMul"],
            },
        )



def layer_damage(inputs: dict[str, np.ndarray], weights: dict[str, np.ndarray],
                 act_max: dict[str, float]) -> dict[str, float]:
    """Relative output error of each layer under W8A8: ``||x W - Q(x) Q(W)|| / ||x W||``.

    ``inputs``: site name -> [rows, K] activations as the quantized graph sees them (after
    smoothing); ``act_max``: the per-tensor max |x| the calibration gives each site's input."""
    from .weights import dequantize, int8_weight

    out = {}
    for name, x in inputs.items():
        w = weights[name]
        s = max(float(act_max[name]), 1e-12) / 127.0
        xq = np.clip(np.rint(x / s), -127, 127) * s
        ref = x @ w
        err = ref - xq @ dequantize(int8_weight(w, axis=1))
        out[name] = float(np.linalg.norm(err) / max(np.linalg.norm(ref), 1e-12))
    return out


def most_damaged(damage: dict[str, float], fraction: float) -> list[str]:
    """The ``fraction`` of layers with the largest damage (at least one), worst first."""
    ranked = sorted(damage, key=damage.get, reverse=True)
    return ranked[: max(1, int(round(len(ranked) * fraction)))]


def refusal(kl: float, target: float, fallback: list[str], kl_all: float) -> str:
    worst = ", ".join(fallback[:3]) + (f" and {len(fallback) - 3} more" if len(fallback) > 3 else "")
    return (f"int8-sq misses its accuracy target on this model: KL {kl:.3g} > {target:g} even with {len(fallback)} "
            f"layers kept W8A16 ({worst}; all-layers W8A8 KL {kl_all:.3g}); nothing was written. Use --quantize "
            f"int8-weight (W8A16) or int4-awq, or accept it with --sq-target-kl {max(kl * 1.1, target):.2g}")


__all__ = ["layer_damage", "most_damaged", "ort_quantize_w8a8", "refusal", "smooth",
           "smoothing_groups"]
