"""Default tolerances per precision, and ``--tol`` overrides.

Two kinds of gate:

* **Elementwise** (Polygraphy ``compare_accuracy`` / ``SimpleCompareFunc``): per output an
  ``atol`` and an ``rtol``; an element fails only when it exceeds *both* (Polygraphy's
  "elemwise" check), so ``atol`` governs values near zero and ``rtol`` large ones.
  ``""`` is the default for outputs not named (Polygraphy's convention); names may be
  globs (``present.*``) that are expanded against the real output names before the
  comparison (Polygraphy wants exact names).
* **Accuracy certificate** (:mod:`.teacher_forced`, over ~2,700 tokens of real text):
  mean KL(reference || candidate) (<=), its 99th percentile (<=), same-top-1 rate (>=),
  perplexity ratio ppl_candidate / ppl_reference (<=); plus the mean cosine similarity of
  logit vectors on the Comparator feeds (>=). Greedy agreement over a generation is reported
  (first divergence, the reference's top-2 margin there) but is not a gate: one near-tie
  flips every later step, which says nothing about the model's accuracy.

Elementwise anchors (see DESIGN.md "What validated means"): onnxruntime's llama parity
script checks logits with rtol = atol = 1e-3 in fp32 and 5e-1 in fp16; we take exactly these
for ``logits``. The KV ``present.*`` outputs use the same numbers in fp32; in fp16 they are
stored in fp16 (one ulp at |x|~4 is 4e-3) and pass through every layer, so 1e-1. Quantized
logits are not expected to match elementwise, so int8/int4 only catch gross breakage there
(int4: logits atol 12, KV atol 4, ~1.3x SmolLM2 int4-awq's measured worst case).

Certificate anchors: llama.cpp's perplexity scoreboard (``llama-perplexity
--kl-divergence``, the statistics this certificate reproduces): Llama-3-8B q8_0 vs fp16 has
mean KL 0.0014 and top-1 97.7%; 4-bit k-/i-quants of 8B models sit at KL ~0.03-0.05, top-1
~90%, KL p99 ~0.3, ppl ratio ~1.04 (IQ4_XS, ggml-org/llama.cpp#12557). Small models lose
more to the same rounding (the 135M SmolLM2 here, ~3x):

* fp32 vs fp32 differs only by summation order: KL ~1e-10, so KL <= 1e-5 / p99 <= 1e-4,
  top-1 >= 99.5%, ppl ratio <= 1.001 leave orders of magnitude of headroom and still catch a
  5% change of one weight matrix.
* fp16 (activations and weights in half precision, ~5e-4 relative per op): KL <= 5e-4,
  p99 <= 5e-3, top-1 >= 98%, ppl ratio <= 1.005. SmolLM2-135M measured KL 1.3e-5, p99 1.5e-4,
  top-1 99.8%, ppl ratio 1.00004 (~30x headroom on KL); top-1 stays at 98% because
  stories260K's near-ties flip ~2% of its argmaxes in fp16.
* int8-weight: KL <= 0.004 (~3x q8_0's 0.0014), top-1 >= 96.5%, p99 <= 0.05, ppl <= 1.03.
* int8-sq (W8A8, activations quantized too): KL <= 0.02, top-1 >= 92%, p99 <= 0.25, ppl <= 1.08.
* int4 (awq / rtn, W4A16): KL <= 0.35, top-1 >= 68%, p99 <= 3.2, ppl <= 1.35. Honest for a
  135M model, not a promise of near-lossless 4-bit: SmolLM2-135M measured (2,765 tokens, ORT
  CPU, loaded shared machine) int4-awq g64 KL 0.275, p99 2.89, top-1 71.4%, ppl x1.27 (passes
  with ~25% headroom on KL; g32 + zero points: KL 0.152, top-1 79.2%) and int4-rtn g64 KL 0.61,
  p99 3.33, top-1 57.6%, ppl x1.55 (fails
  every gate): the gate tells AWQ-quality int4 from plain rounding and from breakage. Larger
  models lose far less (8B 4-bit: KL ~0.03-0.05 above); tighten with ``--tol`` for them.

Every gate can be overridden with ``--tol kl=... / kl_p99=... / top1=... / ppl_ratio=... /
cosine=...``.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field, replace

from ..config import Precision
from ..errors import ValidationError

# metric name -> (direction, description)
METRICS = {
    "kl": ("<=", "mean KL(reference || candidate) of softmax(logits) over the evaluation text, nats"),
    "kl_p99": ("<=", "99th percentile of the per-token KL over the evaluation text, nats"),
    "top1": (">=", "same-top-1 rate over the evaluation text (fraction of tokens)"),
    "ppl_ratio": ("<=", "perplexity ratio ppl_candidate / ppl_reference over the evaluation text"),
    "cosine": (">=", "mean cosine similarity of logit vectors on the Comparator feeds"),
}


@dataclass(frozen=True)
class Tolerances:
    """Elementwise (atol, rtol) per output name or glob ("" = default) + LLM metric gates."""

    precision: str
    elementwise: dict[str, tuple[float, float]]
    metrics: dict[str, float] = field(default_factory=dict)

    def resolve(self, output_names) -> tuple[dict[str, float], dict[str, float]]:
        """(atol, rtol) dicts for Polygraphy: "" default + every output named exactly.

        Exact names win over globs; among globs the longest (most specific) pattern wins.
        """
        default = self.elementwise.get("", (1e-5, 1e-5))
        atol, rtol = {"": default[0]}, {"": default[1]}
        globs = sorted((k for k in self.elementwise if k and any(c in k for c in "*?[")), key=len)
        for name in output_names:
            chosen = None
            for pattern in globs:
                if fnmatch.fnmatchcase(name, pattern):
                    chosen = self.elementwise[pattern]
            if name in self.elementwise:
                chosen = self.elementwise[name]
            if chosen is not None:
                atol[name], rtol[name] = chosen
        return atol, rtol

    def unmatched(self, output_names) -> list[str]:
        """Names / globs that match no output (typos); ``layerwise.*`` ones are left alone."""
        out = []
        for key in self.elementwise:
            if not key or key.startswith("layerwise."):
                continue
            if not any(fnmatch.fnmatchcase(n, key) for n in output_names):
                out.append(key)
        return out

    def for_output(self, name: str) -> tuple[float, float]:
        atol, rtol = self.resolve([name])
        return atol.get(name, atol[""]), rtol.get(name, rtol[""])

    def with_overrides(self, overrides: "dict[str, tuple[float, float] | float]") -> "Tolerances":
        elementwise = dict(self.elementwise)
        metrics = dict(self.metrics)
        for key, value in overrides.items():
            if key in METRICS:
                metrics[key] = float(value)
            else:
                elementwise[key] = (float(value[0]), float(value[1]))
        return replace(self, elementwise=elementwise, metrics=metrics)


_ELEMENTWISE = {
    # logits: onnxruntime's llama parity script (fp32 1e-3, fp16 5e-1).
    "fp32": {"": (1e-3, 1e-3), "logits": (1e-3, 1e-3)},
    "fp16": {"": (1e-1, 1e-1), "logits": (5e-1, 5e-1)},
    # int8: ONNX Runtime's default MatMulNBits path also rounds activations to int8 (stories260K:
    # logits max abs 3.4), so 5; breakage moves logits by their own range.
    "quantized": {"": (1.0, 1.0), "logits": (5.0, 1.0)},
    # int4 (W4A16) moves logits and KV about 3x as far as int8 (SmolLM2 int4-awq g64: logits max abs
    # 9.3, KV 3.2 over the feeds, with KL 0.27); breakage (a wrong block axis or scale) moves them by
    # the logits' own range, which the certificate catches first in any case.
    "int4": {"": (4.0, 1.0), "logits": (12.0, 1.0)},
}

#: certificate gates per scheme family (module doc: why these numbers)
SCHEME_GATES = {
    "fp32": {"kl": 1e-5, "kl_p99": 1e-4, "top1": 0.995, "ppl_ratio": 1.001, "cosine": 0.9999},
    "fp16": {"kl": 5e-4, "kl_p99": 5e-3, "top1": 0.98, "ppl_ratio": 1.005, "cosine": 0.999},
    "int8-weight": {"kl": 0.004, "kl_p99": 0.05, "top1": 0.965, "ppl_ratio": 1.03, "cosine": 0.99},
    "int8-sq": {"kl": 0.02, "kl_p99": 0.25, "top1": 0.92, "ppl_ratio": 1.08, "cosine": 0.98},
    "int4": {"kl": 0.35, "kl_p99": 3.2, "top1": 0.68, "ppl_ratio": 1.35, "cosine": 0.95},
}


def scheme_family(scheme: str) -> str:
    """"int4-awq" / "int4-rtn" -> "int4"; "int8" / unknown int8 schemes -> "int8-sq" (loosest int8)."""
    s = str(scheme).lower()
    if s in SCHEME_GATES:
        return s
    if s.startswith("int4") or s.startswith("w4"):
        return "int4"
    if s.startswith("int8") or s.startswith("w8"):
        return "int8-weight" if "weight" in s else "int8-sq"
    return Precision.parse(s).value


def default_tolerances(precision, scheme: str | None = None) -> Tolerances:
    """Elementwise gates from the precision, certificate gates from the scheme (default: the precision)."""
    prec = str(getattr(precision, "value", precision)).lower()
    family = scheme_family(scheme or prec)
    elementwise = _ELEMENTWISE.get(prec, _ELEMENTWISE["quantized"])
    return Tolerances(family, dict(elementwise), dict(SCHEME_GATES[family]))


def parse_tol(spec: str) -> tuple[str, "tuple[float, float] | float"]:
    """``logits=1e-3:1e-3`` (atol:rtol), ``present.*=1e-2`` (atol = rtol), ``kl=1e-4``.

    ``default=...`` or ``*=...`` sets the default for outputs not named.
    """
    if "=" not in spec:
        raise ValidationError(
            f"--tol {spec!r}: expected NAME=ATOL:RTOL (e.g. logits=1e-3:1e-3, present.*=1e-2) "
            f"or METRIC=VALUE with METRIC one of {', '.join(METRICS)}"
        )
    name, _, value = spec.partition("=")
    name = name.strip()
    if name == "greedy":
        raise ValidationError("--tol greedy=...: greedy agreement is reported, not gated (one near-tie flips every "
                              "later step); gate on kl, kl_p99, top1 or ppl_ratio instead")
    try:
        if name in METRICS:
            return name, float(value)
        parts = [float(v) for v in value.split(":")]
    except ValueError:
        raise ValidationError(f"--tol {spec!r}: {value!r} is not a number (or ATOL:RTOL pair)") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or any(p < 0 for p in parts):
        raise ValidationError(f"--tol {spec!r}: expected ATOL:RTOL with two non-negative numbers")
    if name in ("default", "*"):
        name = ""
    return name, (parts[0], parts[1])


def parse_tols(specs) -> dict:
    return dict(parse_tol(s) for s in specs or ())
