"""Optimization profiles for the two phases of a KV-cache decoder, and picking one at run time.

* profile 0, **prefill**: batch 1..B, seq 1..S, past 0 (empty cache).
* profile 1, **decode**: batch 1..B, seq 1, past 0..C-1.

Every input's dimensions derive from one (batch, seq, past) point, so
``attention_mask = past + seq`` holds at min, at opt and at max (the builder checks the
three points separately and fails on a mismatch). Pure Python: no TensorRT needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from ..errors import BuildError, GenerationError

PREFILL = "prefill"
DECODE = "decode"


INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class ShapeLimits:
    max_batch: int
    max_seq: int         # longest prompt processed in one prefill call
    max_context: int     # past + seq never exceeds this (KV cache length)

    def validate(self, max_position_embeddings: int | None = None) -> "ShapeLimits":
        """Raise :class:`BuildError` naming the option that is wrong."""
        for opt, value in (("--max-batch", self.max_batch), ("--max-seq", self.max_seq),
                           ("--max-context", self.max_context)):
            if not isinstance(value, int) or value < 1:
                raise BuildError(f"{opt} must be an integer >= 1, got {value!r}")
            if value > INT32_MAX:  # TensorRT dimensions are int32 (the bindings raised a TypeError)
                raise BuildError(f"{opt} must be <= {INT32_MAX} (TensorRT dimensions are 32-bit), got {value}")
        if self.max_seq > self.max_context:
            raise BuildError(
                f"--max-seq {self.max_seq} exceeds --max-context {self.max_context}: a prompt cannot be "
                "longer than the context; lower --max-seq or raise --max-context"
            )
        if max_position_embeddings is not None and self.max_context > max_position_embeddings:
            raise BuildError(
                f"--max-context {self.max_context} exceeds the model's max_position_embeddings "
                f"({max_position_embeddings}); lower --max-context"
            )
        return self


@dataclass(frozen=True)
class ProfileSpec:
    """One optimization profile as (batch, seq, past) points."""

    name: str
    index: int
    min: tuple[int, int, int]
    opt: tuple[int, int, int]
    max: tuple[int, int, int]

    def covers(self, batch: int, seq: int, past: int) -> bool:
        return all(lo <= v <= hi for lo, v, hi in zip(self.min, (batch, seq, past), self.max))

    def input_shapes(self, input_names: Iterable[str], num_kv_heads: int, head_dim: int) -> dict[str, tuple]:
        """{input name: (min shape, opt shape, max shape)} for every network input."""
        def dims(name: str, b: int, s: int, p: int) -> tuple[int, ...]:
            if name in ("input_ids", "position_ids"):
                return (b, s)
            if name == "attention_mask":
                return (b, p + s)
            if name.startswith("past_key_values."):
                return (b, num_kv_heads, p, head_dim)
            raise BuildError(f"network input {name!r} is not part of the llama-trt IO contract; re-export the model")

        return {n: (dims(n, *self.min), dims(n, *self.opt), dims(n, *self.max)) for n in input_names}

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "index": self.index, "min": list(self.min), "opt": list(self.opt),
                "max": list(self.max), "axes": ["batch", "seq", "past"]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ProfileSpec":
        return cls(d["name"], int(d["index"]), tuple(d["min"]), tuple(d["opt"]), tuple(d["max"]))


def make_profiles(limits: ShapeLimits) -> tuple[ProfileSpec, ProfileSpec]:
    """(prefill, decode) for ``limits`` (validate the limits first)."""
    B, S, C = limits.max_batch, limits.max_seq, limits.max_context
    prefill = ProfileSpec(PREFILL, 0, (1, 1, 0), (1, max(1, S // 2), 0), (B, S, 0))
    decode = ProfileSpec(DECODE, 1, (1, 1, 0), (1, 1, min(C // 2, C - 1)), (B, 1, C - 1))
    return prefill, decode


def select_profile(profiles: Sequence[ProfileSpec], batch: int, seq: int, past: int) -> int:
    """Index of the profile for one step: prefill for past = 0, decode for seq = 1.

    Raises :class:`GenerationError` when no profile covers the step (e.g. a second
    multi-token chunk on a non-empty cache, or a batch above --max-batch).
    """
    by_name = {p.name: p for p in profiles}
    order = [by_name[n] for n in ((PREFILL, DECODE) if past == 0 else (DECODE, PREFILL)) if n in by_name]
    for p in order:
        if p.covers(batch, seq, past):
            return p.index
    limits = ", ".join(f"{p.name} batch {p.min[0]}..{p.max[0]} seq {p.min[1]}..{p.max[1]} "
                       f"past {p.min[2]}..{p.max[2]}" for p in profiles)
    if past > 0 and seq > 1:
        why = "the engine runs multi-token steps only on an empty cache (prefill) and one token per decode step"
    else:
        why = "the step is outside the engine's shape limits; rebuild with larger --max-batch/--max-seq/--max-context"
    raise GenerationError(f"no optimization profile covers batch {batch}, seq {seq}, past {past}: {why} ({limits})")


__all__ = ["DECODE", "PREFILL", "ProfileSpec", "ShapeLimits", "make_profiles", "select_profile"]
