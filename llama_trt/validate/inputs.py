"""The feed list every runner sees: real token ids, left-padded batches, decode with past.

Token ids are "real" in the sense that matters for a model without a tokenizer here: a
held-out sequence sampled (seeded, temperature 1) from the fp32 reference itself, so it is
text the model finds plausible rather than uniform noise, yet it is not the greedy
continuation the greedy check generates. Callers can pass their own ids instead.

Feeds (named, in order):

* ``prefill``: batch 2, row 0 = the first 12 ids, row 1 = 8 ids left-padded by 4 (mask 0,
  pad id 0, position ids from cumsum(mask) - 1, empty past);
* ``decode1``, ``decode2``: seq 1 per row with past = the torch reference's presents of the
  previous feed (cast to the artifact's KV dtype) and the reference's argmax token;
* ``chunk``: 3 new tokens per row on top of that past (causal mask inside a chunk with past);
* ``heldout``: batch 1, the whole held-out sequence (perplexity and teacher-forced metrics).

Every runner gets identical inputs: the past of the decode feeds comes from the reference,
never from the runner under test.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from ..exporter.feeds import positions_from_mask
from .runners import past_names

PAD_ID = 0


@dataclass
class Feed:
    name: str
    feed: "OrderedDict[str, np.ndarray]"
    valid: np.ndarray  # bool [batch, seq]: query positions that are real tokens


def sample_tokens(model, length: int, seed: int = 0, bos: int | None = 1, temperature: float = 1.0) -> list[int]:
    """Seeded sample from the torch model (KV cache), starting at BOS."""
    import torch

    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    tokens = [bos if bos is not None else 0]
    with torch.no_grad():
        ids = torch.tensor([tokens])
        logits, past = model(ids)
        while len(tokens) < length:
            probs = torch.softmax(logits[0, -1].double() / temperature, -1)
            nxt = int(torch.multinomial(probs, 1, generator=g))
            if not 0 <= nxt < vocab:  # pragma: no cover
                nxt = 0
            tokens.append(nxt)
            mask = torch.ones(1, len(tokens), dtype=torch.int64)
            logits, past = model(torch.tensor([[nxt]]), mask, torch.tensor([[len(tokens) - 1]]), past)
    return tokens


def _feed(ids, mask, past, kv_dtype, num_layers, batch, kv_shape) -> "OrderedDict[str, np.ndarray]":
    ids = np.asarray(ids, dtype=np.int64)
    mask = np.asarray(mask, dtype=np.int64)
    feed = OrderedDict(
        input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask, ids.shape[1]).astype(np.int64)
    )
    names = past_names(num_layers)
    for j, name in enumerate(names):
        if past is None:
            feed[name] = np.zeros((batch, kv_shape[0], 0, kv_shape[1]), dtype=kv_dtype)
        else:
            feed[name] = np.ascontiguousarray(past[j].astype(kv_dtype))
    return feed


def build_feed_list(model, heldout: list[int], kv_dtype) -> list[Feed]:
    """Comparator feeds; decode pasts are the torch reference's presents (see module doc)."""
    import torch

    cfg = model.config
    L = cfg.num_layers
    kv_shape = (cfg.num_kv_heads, cfg.head_dim)
    kv_dtype = np.dtype(kv_dtype)
    n = len(heldout)
    s0, s1 = min(12, n), min(8, n)
    pad = s0 - s1
    ids = np.full((2, s0), PAD_ID, dtype=np.int64)
    ids[0] = heldout[:s0]
    ids[1, pad:] = heldout[:s1][::-1] if s1 > 1 else heldout[:s1]  # different content per row
    ids[1, pad] = heldout[0]  # both rows start with BOS
    mask = np.ones((2, s0), dtype=np.int64)
    mask[1, :pad] = 0
    feeds = [Feed("prefill", _feed(ids, mask, None, kv_dtype, L, 2, kv_shape), mask.astype(bool))]

    def reference(feed):
        t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feed.items()}
        past = [(t[f"past_key_values.{i}.key"].float(), t[f"past_key_values.{i}.value"].float()) for i in range(L)]
        with torch.no_grad():
            logits, presents = model(t["input_ids"], t["attention_mask"], t["position_ids"], past)
        flat = [a.numpy() for kv in presents for a in kv]
        return logits.numpy(), flat

    logits, flat = reference(feeds[-1].feed)
    for step in (1, 2):
        nxt = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones((2, 1), dtype=np.int64)], axis=1)
        f = Feed(f"decode{step}", _feed(nxt, mask, flat, kv_dtype, L, 2, kv_shape), np.ones((2, 1), bool))
        feeds.append(f)
        logits, flat = reference(f.feed)
    chunk = np.stack([np.asarray(heldout[s0 : s0 + 3] + [PAD_ID] * 3)[:3], np.asarray(heldout[1:4] + [PAD_ID] * 3)[:3]])
    mask = np.concatenate([mask, np.ones((2, chunk.shape[1]), dtype=np.int64)], axis=1)
    feeds.append(Feed("chunk", _feed(chunk, mask, flat, kv_dtype, L, 2, kv_shape), np.ones(chunk.shape, bool)))
    hm = np.ones((1, n), dtype=np.int64)
    feeds.append(Feed("heldout", _feed([heldout], hm, None, kv_dtype, L, 1, kv_shape), np.ones((1, n), bool)))
    return feeds


def describe(feed: Feed) -> dict:
    """What the report records about a feed: shapes, token ids, mask."""
    f = feed.feed
    return {
        "name": feed.name,
        "shapes": {k: tuple(int(d) for d in v.shape) for k, v in f.items()},
        "input_ids": tuple(tuple(int(t) for t in row) for row in f["input_ids"]),
        "attention_mask": tuple(tuple(int(t) for t in row) for row in f["attention_mask"]),
        "position_ids": tuple(tuple(int(t) for t in row) for row in f["position_ids"]),
    }
