"""The KV cache of a GroupQueryAttention graph (:mod:`.ort_gqa`): one buffer per layer, updated in place.

Each layer's keys and values live in one ``[batch, n_kv_heads, capacity, head_dim]`` buffer,
bound once per :meth:`SharedKV.__init__` as both ``past_key_values.i.*`` and ``present.i.*``;
the kernel writes each step's new entries at positions ``past .. past + seq - 1`` itself. A
step binds only ids, positions, the padding bias (from ``attention_mask``: the kernel masks the
future itself), the two lengths and the logits, and nothing copies the past.

Positions. In a first prompt (past = 0) ONNX Runtime 1.32 rotates token ``t`` of every row by
``position_ids[0, 0] + t`` (row 0's first entry, whatever the others say); later steps honour
every row's and token's ``position_ids``. So a prefill feeds ``arange(seq)`` to every row, each
row remembers ``offset = index - position`` of its (attended) tokens, and every later step feeds
``position_ids + offset``: RoPE attention sees only differences of positions within a row, so
nothing changes but rounding. A prefill row whose positions do not keep one offset (they skip
inside the row) runs alone: its first token as the first prompt, the rest as a continuation.
Steps the kernel refuses (past > 0, several rows, several tokens: a server's join) run row by row
on views of the buffers.
"""

from __future__ import annotations

import numpy as np

from .ort_gqa import ATTENTION_BIAS, SEQLENS_K, TOTAL_LENGTH


def bind_logits_index(io, has_input: bool, seq: int, last_only: bool) -> int:
    """Feed the session graph's lm-head position index (``ort_lowering.LOGITS_INDEX``); returns
    how many positions the logits cover."""
    if not has_input:
        return seq
    from .ort_lowering import LOGITS_INDEX

    io.bind_cpu_input(LOGITS_INDEX, np.array([seq - 1], np.int64) if last_only else np.arange(seq, dtype=np.int64))
    return 1 if last_only else seq


class _StepFeeds:
    """The small inputs of a one-token step, in buffers bound once by address: a step writes
    them in place and rebinds only the padding bias (its length grows) and the logits. Each
    binding is a call into ONNX Runtime, and right after a model run (whose weights streamed
    through every cache) such a call costs tens of microseconds: SmolLM2 int8 spent 0.48 ms of
    a 7-10 ms decode step outside ``run`` before (0.07 ms with the run left out)."""

    def __init__(self, batch: int, capacity: int, dtype) -> None:
        self.ids = np.zeros((batch, 1), np.int64)
        self.pos = np.zeros((batch, 1), np.int64)
        self.seqlens = np.zeros(batch, np.int32)
        self.total = np.zeros((), np.int32)
        self.index = np.zeros(1, np.int64)  # the logits of the only position
        self.bias = np.zeros(batch * capacity, dtype)
        self.bound = False

    def bind(self, io, logits_index: bool) -> None:
        from .ort_lowering import LOGITS_INDEX

        named = [("input_ids", self.ids), ("position_ids", self.pos), (SEQLENS_K, self.seqlens),
                 (TOTAL_LENGTH, self.total)] + ([(LOGITS_INDEX, self.index)] if logits_index else [])
        for name, arr in named:
            io.bind_input(name, "cpu", 0, arr.dtype.type, list(arr.shape), arr.ctypes.data)
        self.bound = True


class SharedKV:
    """Buffers, bindings and position offsets of one cache of ``batch`` rows x ``capacity`` tokens."""

    def __init__(self, sess, io, *, names, n_kv_heads: int, head_dim: int, dtype, batch: int, capacity: int,
                 vocab_size: int, alloc, ptr, logits_index: bool = False, fill: float) -> None:
        self.sess, self.io = sess, io
        self.names = names                     # [(past k, past v, present k, present v)] per layer
        self.shape = [batch, n_kv_heads, capacity, head_dim]
        self.row_elems = n_kv_heads * capacity * head_dim
        self.dtype = np.dtype(dtype)
        self.vocab_size = vocab_size
        self.logits_index = logits_index
        self.fill = np.asarray(fill, dtype=self.dtype)
        n = batch * self.row_elems
        self.bufs = [(alloc(n), alloc(n)) for _ in names]
        self.ptrs = [(ptr(k), ptr(v)) for k, v in self.bufs]
        self.offset = np.zeros((batch, 1), dtype=np.int64)
        self.device = "cpu" if isinstance(self.bufs[0][0], np.ndarray) else "cuda"
        self._step = _StepFeeds(batch, capacity, self.dtype)
        self._bind_cache(self.shape, 0)

    def _bind_cache(self, shape, row: int) -> None:
        skip = row * self.row_elems * self.dtype.itemsize
        io, dev, dt = self.io, self.device, self.dtype
        for (pk, pv, ok, ov), (kp, vp) in zip(self.names, self.ptrs):
            io.bind_input(pk, dev, 0, dt, shape, kp + skip)
            io.bind_output(ok, dev, 0, dt, shape, kp + skip)
            io.bind_input(pv, dev, 0, dt, shape, vp + skip)
            io.bind_output(ov, dev, 0, dt, shape, vp + skip)

    def _run(self, ids, mask, pos, logits, last_only: bool) -> None:
        io = self.io
        self._step.bound = False  # the names below get other buffers
        b, seq = ids.shape
        total = mask.shape[1]
        # padding only: the kernel masks the future itself
        pad = np.where(mask != 0, np.zeros((), self.dtype), self.fill)[:, None, None, :]
        io.bind_cpu_input("input_ids", ids)
        io.bind_cpu_input(ATTENTION_BIAS, np.ascontiguousarray(np.broadcast_to(pad, (b, 1, seq, total))))
        io.bind_cpu_input(SEQLENS_K, np.full(b, total - 1, dtype=np.int32))
        io.bind_cpu_input(TOTAL_LENGTH, np.array(total, dtype=np.int32))
        io.bind_cpu_input("position_ids", pos)
        bind_logits_index(io, self.logits_index, ids.shape[1], last_only)
        io.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        self.sess.run_with_iobinding(io)

    def forward(self, ids, mask, pos, past: int, last_only: bool = False) -> np.ndarray:
        b, seq = ids.shape
        if not self.logits_index:  # the graph computes every position: slice afterwards
            out = self._forward(ids, mask, pos, past, False)
            return out[:, -1:] if last_only else out
        return self._forward(ids, mask, pos, past, last_only)

    def _forward(self, ids, mask, pos, past: int, last_only: bool) -> np.ndarray:
        b, seq = ids.shape
        logits = np.empty((b, 1 if last_only else seq, self.vocab_size), dtype=np.float32)
        if past == 0 and self._set_prefill_offsets(mask, pos):
            self._run(ids, mask, np.broadcast_to(np.arange(seq, dtype=np.int64), (b, seq)).copy(), logits, last_only)
        elif past == 0:
            self._by_rows(lambda r, out: self._prefill_row(ids[r:r + 1], mask[r:r + 1], pos[r:r + 1], out, last_only),
                          logits)
        elif b > 1 and seq > 1:
            pos = pos + self.offset
            self._by_rows(lambda r, out: self._run(ids[r:r + 1], mask[r:r + 1], pos[r:r + 1].copy(), out, last_only),
                          logits)
        elif seq == 1 and self.device == "cpu":
            self._run_step(ids, mask, pos, logits)
        else:
            self._run(ids, mask, pos + self.offset, logits, last_only)
        return logits

    def _run_step(self, ids, mask, pos, logits) -> None:
        """One token per row on top of the cache (what decoding is): ``_run`` through the
        buffers of :class:`_StepFeeds`."""
        feeds, io = self._step, self.io
        b, total = mask.shape
        if not feeds.bound:
            feeds.bind(io, self.logits_index)
        np.copyto(feeds.ids, ids)
        np.add(pos, self.offset, out=feeds.pos)
        feeds.seqlens.fill(total - 1)
        feeds.total.fill(total)
        bias = feeds.bias[: b * total].reshape(b, total)
        bias.fill(0)
        np.copyto(bias, self.fill, where=mask == 0)  # padding only: the kernel masks the future itself
        io.bind_input(ATTENTION_BIAS, "cpu", 0, self.dtype.type, [b, 1, 1, total], bias.ctypes.data)
        io.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        self.sess.run_with_iobinding(io)

    def _by_rows(self, run_row, logits) -> None:
        """``run_row(r, logits[r:r+1])`` for every row, the cache bound to that row's slice."""
        row_shape = [1] + self.shape[1:]
        try:
            for r in range(logits.shape[0]):
                self._bind_cache(row_shape, r)
                run_row(r, logits[r:r + 1])
        finally:
            self._bind_cache(self.shape, 0)

    def _prefill_row(self, ids, mask, pos, logits, last_only: bool) -> None:
        """One row whose positions are not index + constant: the first token alone (a first
        prompt starts at its position), then the rest as a continuation (positions honoured)."""
        seq = ids.shape[1]
        head = np.empty((1, 1, self.vocab_size), dtype=np.float32)
        self._run(ids[:, :1], mask[:, :1], pos[:, :1].copy(), head, False)
        if seq == 1:
            logits[:] = head
            return
        tail = logits if last_only else logits[:, 1:]
        self._run(ids[:, 1:], mask[:, :seq], pos[:, 1:].copy(), tail, last_only)
        if not last_only:
            logits[:, :1] = head

    def _set_prefill_offsets(self, mask, pos) -> bool:
        """Offsets for a batched prefill rotated by arange(seq); False when a row has no single one."""
        seq = pos.shape[1]
        index = np.arange(seq, dtype=np.int64)[None, :]
        diff = index - pos
        valid = mask[:, -seq:] != 0
        offsets = np.where(valid.any(1), diff[np.arange(len(diff)), np.argmax(valid, axis=1)], 0)
        if np.any(valid & (diff != offsets[:, None])):
            self.offset[:] = 0  # row by row, with the real positions
            return False
        self.offset[:, 0] = offsets
        return True

    def cache(self, past: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """A numpy copy of the first ``past`` entries: [(key, value)] per layer."""
        out = []
        for k, v in self.bufs:
            arrs = [x if isinstance(x, np.ndarray) else x.numpy() for x in (k, v)]
            out.append(tuple(a.reshape(self.shape)[:, :, :past].copy() for a in arrs))
        return out


__all__ = ["SharedKV", "bind_logits_index"]
