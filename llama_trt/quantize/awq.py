"""AWQ (Lin et al. 2024, "Activation-aware Weight Quantization"): scale and clipping search.

Used by int4-awq (int4 blocks) and by int8-weight (int8 per channel, scale search only).

For each set of linear layers reading one activation ``x`` (q/k/v after ``input_layernorm``,
gate/up after ``post_attention_layernorm``, down after ``up``, o after ``v`` when their
shapes match, i.e. without GQA, as AutoAWQ does), the per-input-channel scale
``s = mean|x|^a`` (normalized by ``sqrt(max s * min s)``) is searched over a grid of ``a`` in
[0, 1) to minimize ``|| x W - (x / s) Q(s W) ||^2`` on calibration activations, ``Q`` being
the int4 block quantizer the export uses. ``s`` is folded exactly into the previous op (the
RMSNorm weight, or the output columns of up / v), so the float model is unchanged and only the
rounding moves to where activations are small. Then, per layer (not q/k, whose errors the
softmax amplifies; AutoAWQ skips them too), a clipping ratio per block and output channel is
searched in [0.55, 1] to minimize the layer's output error.

Runs in torch (float32) on the captured inputs; the graph edits are numpy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .graph import LinearSite, _init_array, _replace_init, private_initializer
from .stats import input_key

SCALE_GRID = 10
CLIP_STEPS = 10          # ratios 1.0, 0.95, ..., 0.55
CLIP_ROWS = 256
NO_CLIP = ("q_proj", "k_proj")


@dataclass
class AwqReport:
    scales: dict[str, dict[str, float]] = field(default_factory=dict)   # group -> alpha, loss before/after
    clipped: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)                    # groups with no exact fold
    vectors: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # input key -> the s folded in

    def to_dict(self) -> dict:
        return {"scale_search": self.scales, "clip_search": self.clipped, "unscaled": self.skipped,
                "grid": SCALE_GRID, "clip_ratios": [round(1 - i / 20, 2) for i in range(CLIP_STEPS)]}


def fake_quant(w, group: int | None, symmetric: bool, clip=None):
    """torch twin of :func:`.weights.quantize_blocked` + :func:`.weights.dequantize` ([K, N]);
    ``group=None``: of :func:`.weights.int8_weight` (int8, one scale per output channel)."""
    import torch

    if group is None:
        s = w.abs().amax(0, keepdim=True) / 127.0
        s = torch.where(s > 0, s, torch.ones_like(s))
        return torch.round(w / s).clamp(-127, 127) * s
    k, n = w.shape
    b = w.reshape(k // group, group, n)
    if clip is not None:
        b = torch.maximum(torch.minimum(b, clip[:, None]), -clip[:, None])
    if symmetric:
        s = b.abs().amax(1, keepdim=True) / 7.0
        s = torch.where(s > 0, s, torch.ones_like(s))
        return (torch.round(b / s).clamp(-8, 7) * s).reshape(k, n)
    lo, hi = b.amin(1, keepdim=True).clamp(max=0), b.amax(1, keepdim=True).clamp(min=0)
    s = torch.where(hi > lo, (hi - lo) / 15.0, torch.ones_like(hi))
    zp = torch.round(-lo / s).clamp(0, 15)
    return ((torch.round(b / s) + zp).clamp(0, 15) - zp).mul(s).reshape(k, n)


def search_scale(x, w, group: int | None, symmetric: bool) -> tuple[np.ndarray, dict[str, float]]:
    """Best ``s`` [K] for input ``x`` [n, K] and the layers' weights ``w`` [K, N] side by side."""
    import torch

    ref = x @ w
    mean = x.abs().mean(0).clamp(min=1e-6)
    best, best_s, stats = None, None, {}
    for i in range(SCALE_GRID):
        a = i / SCALE_GRID
        s = mean.pow(a)
        s = s / torch.sqrt(s.max() * s.min())
        out = (x / s) @ fake_quant(w * s[:, None], group, symmetric)
        loss = float((ref - out).pow(2).mean())
        if i == 0:
            stats["loss_rtn"] = loss
        if best is None or loss < best:
            best, best_s, stats["alpha"] = loss, s, a
    stats["loss_awq"] = best
    return best_s.numpy().astype(np.float32), stats


def search_clip(x, w, group: int, symmetric: bool) -> np.ndarray:
    """Per block and output channel max |w| [K/g, N] that minimizes the output error."""
    import torch

    k, n = w.shape
    g = k // group
    xg = x[:CLIP_ROWS].reshape(-1, g, group)                        # [r, G, g]
    wg = w.reshape(g, group, n)                                      # [G, g, N]
    ref = torch.einsum("rgk,gkn->rgn", xg, wg)
    amax = wg.abs().amax(1)                                          # [G, N]
    best_err = torch.full_like(amax, float("inf"))
    best = amax.clone()
    for i in range(CLIP_STEPS):
        c = amax * (1 - i / 20)
        q = fake_quant(w, group, symmetric, clip=c).reshape(g, group, n)
        err = (torch.einsum("rgk,gkn->rgn", xg, q) - ref).pow(2).mean(0)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, c, best)
    return best.numpy().astype(np.float32)


def _groups(sites: list[LinearSite], norms: dict[str, str], cfg: dict) -> list[tuple[str, list, tuple]]:
    """(input key, its sites, how to fold s) for every foldable set of layers."""
    by_key: dict[str, list[LinearSite]] = {}
    for s in sites:
        by_key.setdefault(input_key(s.name), []).append(s)
    name_to_site = {s.name: s for s in sites}
    out = []
    for key, group in by_key.items():
        leaf = key.rpartition(".")[2]
        layer = key.rpartition(".")[0].rpartition(".")[0]
        if leaf in ("q_proj", "gate_proj") and group[0].input in norms:
            out.append((key, group, ("norm", norms[group[0].input])))
        elif leaf == "down_proj" and f"{layer}.mlp.up_proj" in name_to_site:
            out.append((key, group, ("columns", name_to_site[f"{layer}.mlp.up_proj"].weight)))
        elif leaf == "o_proj" and int(cfg.get("num_kv_heads", 0)) == int(cfg.get("num_heads", -1)) \
                and f"{layer}.self_attn.v_proj" in name_to_site:
            out.append((key, group, ("columns", name_to_site[f"{layer}.self_attn.v_proj"].weight)))
        else:
            out.append((key, group, ("none", "")))
    return out


def norm_outputs(model) -> dict[str, str]:
    """RMSNorm output -> its weight initializer, for norms read only by MatMuls."""
    nodes = model.graph.node
    out = {}
    for node in nodes:
        if node.domain == "llama_trt" and node.op_type == "RMSNorm":
            readers = [n for n in nodes if node.output[0] in n.input]
            if readers and all(n.op_type == "MatMul" for n in readers):
                out[node.output[0]] = node.input[1]
    return out


def apply_awq(model, sites: list[LinearSite], inputs: dict[str, np.ndarray], group: int | None, symmetric: bool,
              cfg: dict, on_group=None) -> tuple[dict[str, np.ndarray], AwqReport]:
    """Search and fold the scales into ``model`` (in place); return per-site clip [K/g, N] and a report.

    ``sites`` are the layers that will be stored as int4 (``K`` divisible by ``group``), or with
    ``group=None`` as int8 per channel (scale search only: the clip search is for int4 blocks)."""
    import torch

    graph = model.graph
    report = AwqReport()
    clips: dict[str, np.ndarray] = {}
    for key, group_sites, (how, target) in _groups(sites, norm_outputs(model), cfg):
        x = torch.from_numpy(inputs[key])
        ws = [torch.from_numpy(np.array(_init_array(graph, s.weight))) for s in group_sites]
        if how == "none":
            report.skipped.append(key)
        else:
            s, stats = search_scale(x, torch.cat(ws, dim=1), group, symmetric)
            report.scales[key] = {k: round(v, 8) for k, v in stats.items()}
            report.vectors[key] = s
            if how == "norm":  # this norm's own weight: another norm may share the tensor
                norm = next(n for n in graph.node if group_sites[0].input in n.output)
                target = private_initializer(graph, target, norm)
                _replace_init(graph, target, (_init_array(graph, target) / s).astype(np.float32))
            else:
                _replace_init(graph, target, (_init_array(graph, target) / s[None, :]).astype(np.float32))
                owner = next((t.name for t in sites if t.weight == target), None)
                if owner in clips:  # a column scaled by 1/s has its best clip scaled by 1/s too
                    clips[owner] = (clips[owner] / s[None, :]).astype(np.float32)
            for site, w in zip(group_sites, ws):
                _replace_init(graph, site.weight, (w.numpy() * s[:, None]).astype(np.float32))
            x = x / torch.from_numpy(s)
            ws = [torch.from_numpy(np.array(_init_array(graph, site.weight))) for site in group_sites]
        for site, w in zip(group_sites, ws):
            if group is not None and site.name.rpartition(".")[2] not in NO_CLIP:
                clips[site.name] = search_clip(x, w, group, symmetric)
                report.clipped.append(site.name)
        if on_group is not None:
            on_group()
    return clips, report


__all__ = ["AwqReport", "apply_awq", "fake_quant", "norm_outputs", "search_clip", "search_scale"]
