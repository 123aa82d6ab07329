"""Feed dicts for the exported ONNX file (numpy only: no torch needed).

Shared by the exporter's own check, the validator and the ONNX Runtime session::

    feeds = build_feeds(manifest, input_ids, attention_mask)          # prefill, empty past
    outs = session.run(None, feeds)
    logits, presents = split_outputs(manifest, outs)
    feeds = build_feeds(manifest, next_ids, mask, past=presents)       # decode

Accepts numpy arrays, lists or CPU torch tensors.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import ValidationError
from .manifest import ExportManifest


def past_names(num_layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def positions_from_mask(attention_mask: np.ndarray, seq: int) -> np.ndarray:
    """position_ids of the last ``seq`` tokens of a left-padded batch (cumsum(mask) - 1, pads at 0)."""
    pos = np.cumsum(np.asarray(attention_mask, dtype=np.int64), axis=-1) - 1
    return np.maximum(pos, 0)[:, -seq:]


def _np(x, dtype=None) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    return a.astype(dtype, copy=False) if dtype is not None else a


def empty_past(manifest: ExportManifest, batch: int) -> list[np.ndarray]:
    c = manifest.config
    shape = (batch, int(c["num_kv_heads"]), 0, int(c["head_dim"]))
    return [np.zeros(shape, dtype=manifest.kv_dtype) for _ in range(2 * manifest.num_layers)]


def flatten_past(past) -> list:
    """[k0, v0, k1, v1, ...] from that same list or from [(k0, v0), (k1, v1), ...]."""
    flat = []
    for item in past:
        if isinstance(item, (tuple, list)):
            flat.extend(item)
        else:
            flat.append(item)
    return flat


def build_feeds(
    manifest: ExportManifest,
    input_ids,
    attention_mask=None,
    position_ids=None,
    past: Sequence | None = None,
) -> dict[str, np.ndarray]:
    """The ONNX Runtime feed dict for one forward step.

    ``attention_mask`` covers past + new tokens (1 = attend; default all ones);
    ``position_ids`` default to cumsum(mask) - 1 of the new tokens; ``past`` is the
    previous step's presents (flat or per-layer pairs), default empty (prefill).
    """
    ids = _np(input_ids, np.int64)
    if ids.ndim != 2:
        raise ValidationError(f"input_ids must be [batch, seq], got shape {list(ids.shape)}")
    batch, seq = ids.shape
    n = 2 * manifest.num_layers
    if past is None:
        past_arrays = empty_past(manifest, batch)
    else:
        past_arrays = [_np(p, manifest.kv_dtype) for p in flatten_past(past)]
        if len(past_arrays) != n:
            raise ValidationError(f"expected {n} past tensors (key and value per layer), got {len(past_arrays)}")
    past_len = past_arrays[0].shape[2]
    if attention_mask is None:
        mask = np.ones((batch, past_len + seq), dtype=np.int64)
    else:
        mask = _np(attention_mask, np.int64)
    if mask.shape != (batch, past_len + seq):
        raise ValidationError(
            f"attention_mask must be [batch, past + seq] = [{batch}, {past_len + seq}], got {list(mask.shape)}"
        )
    pos = positions_from_mask(mask, seq) if position_ids is None else _np(position_ids, np.int64)
    if pos.shape != (batch, seq):
        raise ValidationError(f"position_ids must be [batch, seq] = [{batch}, {seq}], got {list(pos.shape)}")
    feeds = {
        "input_ids": np.ascontiguousarray(ids),
        "attention_mask": np.ascontiguousarray(mask),
        "position_ids": np.ascontiguousarray(pos),
    }
    for name, arr in zip(past_names(manifest.num_layers), past_arrays):
        feeds[name] = np.ascontiguousarray(arr)
    return feeds


def split_outputs(manifest: ExportManifest, outputs: Sequence[np.ndarray]):
    """(logits, presents) from ``session.run(None, feeds)`` in manifest output order."""
    names = manifest.output_names
    by_name = dict(zip(names, outputs))
    presents = [by_name[n] for n in present_names(manifest.num_layers)]
    return by_name["logits"], presents


def ort_session(folder_or_model, providers=None, log_severity: int = 3):
    """An ONNX Runtime session on an export folder (or a .onnx path); CPU by default."""
    from pathlib import Path

    import onnxruntime as ort

    path = Path(folder_or_model)
    if path.is_dir():
        from .manifest import load_manifest

        path = load_manifest(path).model_path(path)
    opts = ort.SessionOptions()
    opts.log_severity_level = log_severity
    return ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])


__all__ = [
    "build_feeds", "empty_past", "flatten_past", "ort_session", "past_names", "positions_from_mask",
    "present_names", "split_outputs",
]
