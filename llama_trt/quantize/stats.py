"""Activation statistics on calibration text.

* :func:`activation_absmax`: ``max |x|`` per channel of graph tensors, read by running the fp32
  export in ONNX Runtime with those tensors added as outputs (SmoothQuant's statistic).
* :func:`linear_inputs`: the inputs of the linear layers of the torch model (forward
  pre-hooks), a seeded subsample of token rows per input: what AWQ's scale and clipping
  searches need (and the per-layer damage of W8A8). Layers sharing an input (q/k/v, gate/up)
  share one entry, keyed by the first layer's name.
* :func:`linear_hessians`: ``2 X^T X / n`` of the same inputs over every calibration token
  (accumulated batch by batch, never holding the rows): GPTQ's statistic.
"""

from __future__ import annotations

import numpy as np

#: layers that read the same activation: the first name is the key of the shared input
SHARED_INPUT = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}


def _probe_session(model, tensors):
    """An ONNX Runtime CPU session of ``model`` (not modified) with ``tensors`` as extra outputs."""
    import onnx
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    existing = {o.name for o in m.graph.output}
    for t in tensors:
        if t not in existing:
            m.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def activation_absmax(model, manifest, batches, tensors, on_batch=None) -> dict[str, np.ndarray]:
    """max |x| per last-axis channel of each tensor in ``tensors`` over the calibration batches."""
    from ..exporter.feeds import build_feeds

    sess = _probe_session(model, tensors)
    out: dict[str, np.ndarray] = {}
    for ids in batches:
        vals = sess.run(list(tensors), build_feeds(manifest, ids))
        for t, v in zip(tensors, vals):
            cur = np.abs(v.reshape(-1, v.shape[-1])).max(axis=0)
            out[t] = cur if t not in out else np.maximum(out[t], cur)
        if on_batch is not None:
            on_batch()
    return out


def input_key(name: str) -> str:
    """The module whose input ``name`` reads: model.layers.3.self_attn.k_proj -> ...q_proj."""
    head, _, leaf = name.rpartition(".")
    return f"{head}.{SHARED_INPUT[leaf]}" if leaf in SHARED_INPUT else name


def _feed_linear_inputs(torch_model, batches, keys, on_input, on_batch=None) -> None:
    """Run the batches through the torch model, calling ``on_input(key, X [rows, K] float32)`` with
    the input of every linear module in ``keys`` (forward pre-hooks, removed afterwards)."""
    import torch

    modules = dict(torch_model.named_modules())
    hooks = []
    for k in keys:
        def hook(_mod, args, k=k):
            on_input(k, args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32))
        hooks.append(modules[k].register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for ids in batches:
                torch_model(torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)))
                if on_batch is not None:
                    on_batch()
    finally:
        for h in hooks:
            h.remove()


def linear_inputs(torch_model, batches, names, *, max_rows: int = 512, seed: int = 0,
                  on_batch=None) -> dict[str, np.ndarray]:
    """``{input key: [rows, K] float32}`` for the linear modules ``names`` (HF module names)."""
    import torch

    keys = sorted({input_key(n) for n in names})
    chunks: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    _feed_linear_inputs(torch_model, batches, keys, lambda k, x: chunks[k].append(x.clone()), on_batch)
    rows = sum(c.shape[0] for c in chunks[keys[0]]) if keys else 0
    pick = np.sort(np.random.default_rng(seed).choice(rows, min(rows, max_rows), replace=False))
    return {k: torch.cat(v)[torch.from_numpy(pick)].numpy() for k, v in chunks.items()}


def linear_hessians(torch_model, batches, names, on_batch=None) -> tuple[dict[str, np.ndarray], int]:
    """``({input key: 2 X^T X / n [K, K] float32}, n)`` for the linear modules ``names``, X being
    every token row of their input over the batches."""
    keys = sorted({input_key(n) for n in names})
    sums: dict = {}
    rows = {k: 0 for k in keys}

    def accumulate(k, x):
        xtx = x.T @ x
        sums[k] = xtx if k not in sums else sums[k].add_(xtx)
        rows[k] += x.shape[0]

    _feed_linear_inputs(torch_model, batches, keys, accumulate, on_batch)
    n = max(rows.values()) if rows else 0
    return {k: (sums[k] * (2.0 / rows[k])).numpy() for k in keys if rows[k]}, n


def capture_tensors(model, manifest, batches, tensors, *, max_rows: int = 512,
                    seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Rows ``[<= max_rows, C]`` of graph tensors (last axis kept) over the batches (ONNX Runtime),
    and each tensor's max |x| over all rows."""
    from ..exporter.feeds import build_feeds

    sess = _probe_session(model, tensors)
    parts: dict[str, list[np.ndarray]] = {t: [] for t in tensors}
    for ids in batches:
        for t, v in zip(tensors, sess.run(list(tensors), build_feeds(manifest, ids))):
            parts[t].append(v.reshape(-1, v.shape[-1]))
    rows = sum(p.shape[0] for p in parts[tensors[0]]) if tensors else 0
    pick = np.sort(np.random.default_rng(seed).choice(rows, min(rows, max_rows), replace=False))
    return ({t: np.concatenate(p)[pick] for t, p in parts.items()},
            {t: float(max(np.abs(a).max() for a in p)) for t, p in parts.items()})

__all__ = ["SHARED_INPUT", "activation_absmax", "capture_tensors", "input_key", "linear_hessians", "linear_inputs"]
