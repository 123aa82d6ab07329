"""Model configuration shared by every stage.

:class:`LlamaConfig` is a frozen dataclass that validates itself and reports
every problem at once. It is what a checkpoint loader produces, what the torch
model is built from and what every manifest records.
"""

from __future__ import annotations

import enum
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from .errors import ConfigError


class Precision(str, enum.Enum):
    """Numeric precision of an artifact (export dtype or engine precision)."""

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"
    INT4 = "int4"          # int4 weights (weight-only; activations stay float)

    @classmethod
    def parse(cls, value: "str | Precision") -> "Precision":
        if isinstance(value, Precision):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            choices = ", ".join(p.value for p in cls)
            raise ConfigError(f"unknown precision {value!r}; choose one of: {choices}") from None


ROPE_SCALING_TYPES = ("linear", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling.

    ``linear``: positions are divided by ``factor`` (equivalently inv_freq / factor).
    ``llama3``: Llama 3.1 wavelength-dependent scaling with ``low_freq_factor``,
    ``high_freq_factor`` and ``original_max_position_embeddings``.
    """

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def problems(self) -> list[str]:
        out = []
        if self.rope_type not in ROPE_SCALING_TYPES:
            out.append(
                f"rope_scaling type {self.rope_type!r} is not supported "
                f"(supported: none, {', '.join(ROPE_SCALING_TYPES)})"
            )
        if not self.factor > 0:
            out.append(f"rope_scaling factor must be > 0, got {self.factor}")
        if self.rope_type == "llama3":
            if not self.high_freq_factor > self.low_freq_factor:
                out.append(
                    "rope_scaling llama3 needs high_freq_factor > low_freq_factor, got "
                    f"{self.high_freq_factor} <= {self.low_freq_factor}"
                )
            if self.original_max_position_embeddings <= 0:
                out.append("rope_scaling original_max_position_embeddings must be > 0")
        return out


@dataclass(frozen=True)
class LlamaConfig:
    """Architecture of a LLaMA-family decoder.

    ``rope_interleaved`` says how the checkpoint pairs RoPE channels: False for the
    Hugging Face "rotate_half" pairing (i, i + d/2), True for Meta's and llama2.c's
    interleaved pairs (2i, 2i+1). Weights are used as stored; no permutation.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0  # 0 = hidden_size // num_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rope_interleaved: bool = False
    rotary_dim: int = 0  # 0 = head_dim (full rotary)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: tuple[int, ...] = (2,)

    def __post_init__(self) -> None:
        # Derived fields (frozen dataclass: go through object.__setattr__).
        if not self.head_dim and self.num_heads > 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if not self.rotary_dim:
            object.__setattr__(self, "rotary_dim", self.head_dim)
        eos = self.eos_token_id
        if eos is None:
            eos = ()
        elif isinstance(eos, int):
            eos = (eos,)
        object.__setattr__(self, "eos_token_id", tuple(int(e) for e in eos))
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        problems = self.problems()
        if problems:
            raise ConfigError(
                "invalid LlamaConfig:\n  - " + "\n  - ".join(problems)
            )

    def problems(self) -> list[str]:
        """Every inconsistency, not just the first."""
        out: list[str] = []
        positive = (
            "vocab_size", "hidden_size", "intermediate_size", "num_layers",
            "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                out.append(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.num_heads, int) and isinstance(self.num_kv_heads, int):
            if self.num_kv_heads > 0 and self.num_heads % self.num_kv_heads:
                out.append(
                    f"num_kv_heads ({self.num_kv_heads}) must divide num_heads ({self.num_heads})"
                )
        if isinstance(self.head_dim, int) and self.head_dim > 0:
            if self.head_dim % 2:
                out.append(f"head_dim must be even for RoPE, got {self.head_dim}")
            if not (0 < self.rotary_dim <= self.head_dim) or self.rotary_dim % 2:
                out.append(
                    f"rotary_dim must be even and in 1..head_dim ({self.head_dim}), got {self.rotary_dim}"
                )
        if not (isinstance(self.rms_norm_eps, (int, float)) and self.rms_norm_eps > 0):
            out.append(f"rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 1):
            out.append(f"rope_theta must be > 1, got {self.rope_theta!r}")
        if self.rope_scaling is not None:
            out.extend(self.rope_scaling.problems())
        vocab = self.vocab_size if isinstance(self.vocab_size, int) else 0
        ids = ([self.bos_token_id] if self.bos_token_id is not None else []) + list(self.eos_token_id)
        for tid in ids:
            if vocab and not (0 <= tid < vocab):
                out.append(f"special token id {tid} is outside the vocabulary (0..{vocab - 1})")
        return out

    # ---- derived quantities -------------------------------------------------
    @property
    def num_groups(self) -> int:
        """Query heads per KV head (GQA group size)."""
        return self.num_heads // self.num_kv_heads

    def num_parameters(self) -> int:
        h, i, v, d = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
        attn = h * self.num_heads * d * 2 + h * self.num_kv_heads * d * 2
        mlp = 3 * h * i
        per_layer = attn + mlp + 2 * h
        total = v * h + self.num_layers * per_layer + h
        if not self.tie_word_embeddings:
            total += v * h
        return total

    def inv_freq(self) -> list[float]:
        """RoPE inverse frequencies (length rotary_dim/2), scaling applied.

        Computed in float64 here; the model stores them as float32 exactly as the
        Hugging Face reference does (``_compute_default_rope_parameters`` and
        ``_compute_llama3_parameters``).
        """
        half = self.rotary_dim // 2
        base = [1.0 / (self.rope_theta ** (2 * i / self.rotary_dim)) for i in range(half)]
        s = self.rope_scaling
        if s is None:
            return base
        if s.rope_type == "linear":
            return [f / s.factor for f in base]
        # llama3
        low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
        high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
        out = []
        for f in base:
            wavelen = 2 * math.pi / f
            if wavelen > low_wavelen:
                out.append(f / s.factor)
            elif wavelen < high_wavelen:
                out.append(f)
            else:
                smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
                    s.high_freq_factor - s.low_freq_factor
                )
                out.append((1 - smooth) * f / s.factor + smooth * f)
        return out

    # ---- (de)serialisation ---------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["eos_token_id"] = list(self.eos_token_id)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LlamaConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown LlamaConfig fields: {', '.join(unknown)}")
        data = dict(data)
        if data.get("rope_scaling") is not None and not isinstance(data["rope_scaling"], RopeScaling):
            data["rope_scaling"] = RopeScaling(**data["rope_scaling"])
        if "eos_token_id" in data and isinstance(data["eos_token_id"], list):
            data["eos_token_id"] = tuple(data["eos_token_id"])
        return cls(**data)


def bytes_per_param(precision: Precision) -> float:
    return {Precision.FP32: 4.0, Precision.FP16: 2.0, Precision.INT8: 1.0, Precision.INT4: 0.5}[precision]


__all__ = ["LlamaConfig", "RopeScaling", "Precision", "bytes_per_param"]
