"""Greedy generation with the KV cache through Polygraphy runners: the reference's and the artifact's.

Each side decodes on its own (its own tokens fed back), so the result tells where the two
paths part and how close the reference's top-2 logits were there. Information, not a gate:
one near-tie flips every later token. The reference's side comes from a
:class:`~.reference.TorchReference`, computed once for several artifacts.
"""

from __future__ import annotations

import numpy as np

from . import metrics as M
from .report import GreedyResult, finite


def _copy_outputs(outputs) -> dict:
    return {k: np.array(v, copy=True) for k, v in outputs.items()}


def greedy_generate(runner, prompt: list[int], steps: int, num_layers: int, kv_dtype,
                    head_shape) -> tuple[list[int], list[np.ndarray]]:
    """Greedy decoding through any Polygraphy runner with the KV cache (batch 1)."""
    from collections import OrderedDict

    from ..exporter.feeds import positions_from_mask
    from .runners import past_names

    names = past_names(num_layers)
    ids = np.asarray([prompt], dtype=np.int64)
    mask = np.ones((1, len(prompt)), dtype=np.int64)
    past = [np.zeros((1, head_shape[0], 0, head_shape[1]), dtype=kv_dtype) for _ in names]
    tokens, step_logits = [], []
    for _ in range(steps):
        feed = OrderedDict(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask, ids.shape[1]))
        feed.update((n, np.ascontiguousarray(p.astype(kv_dtype, copy=False))) for n, p in zip(names, past))
        out = _copy_outputs(runner.infer(feed))
        last = out["logits"][0, -1].astype(np.float64)
        step_logits.append(last)
        nxt = int(np.argmax(last))
        tokens.append(nxt)
        past = [out[f"present.{i}.{kv}"] for i in range(num_layers) for kv in ("key", "value")]
        ids = np.asarray([[nxt]], dtype=np.int64)
        mask = np.ones((1, mask.shape[1] + 1), dtype=np.int64)
    return tokens, step_logits


def greedy_result(ref, candidate, prompt: list[int], steps: int, kv_dtype) -> GreedyResult:
    """Greedy ``steps`` from ``prompt``: ``ref`` (a TorchReference, fp32 KV cache) vs the
    ``candidate`` Polygraphy runner (KV cache in ``kv_dtype``)."""
    cfg = ref.config
    head_shape = (cfg.num_kv_heads, cfg.head_dim)

    def decode(runner, ids, n, dtype):
        return greedy_generate(runner, ids, n, cfg.num_layers, dtype, head_shape)

    ref_tokens, ref_steps = ref.greedy(prompt, steps, lambda runner, ids, n: decode(runner, ids, n, np.float32))
    with candidate as runner:
        cand_tokens, cand_steps = decode(runner, prompt, steps, kv_dtype)
    agreement, first_div = M.greedy_agreement(ref_tokens, cand_tokens)
    upto = steps if first_div is None else first_div + 1
    kl_steps = [float(M.kl_divergence(a, b)) for a, b in zip(ref_steps[:upto], cand_steps[:upto])]
    margin = None
    if first_div is not None:
        top2 = np.sort(ref_steps[first_div])[-2:]
        margin = float(top2[1] - top2[0])
    return GreedyResult(
        prompt=tuple(prompt), steps=steps, reference_tokens=tuple(ref_tokens), candidate_tokens=tuple(cand_tokens),
        agreement=float(agreement), first_divergence=first_div, kl_per_step=tuple(finite(k) for k in kl_steps),
        top1_margin_at_divergence=margin,
    )


__all__ = ["greedy_generate", "greedy_result"]
