"""The accuracy certificate: what ``validate`` measured on real text, kept in the artifact.

``validate`` writes an :class:`AccuracyCertificate` into the export folder's ``manifest.json``
(key ``"certificate"``, rewritten atomically: temp file + rename), so ``run`` and ``serve``
can say what was verified (:func:`verified_line`). The metrics are teacher-forced over real
text against the fp32 torch model (see :mod:`.teacher_forced`); the gates are the
``kl`` / ``kl_p99`` / ``top1`` / ``ppl_ratio`` entries of :mod:`.tolerances`.

Light on purpose (json + dataclasses only): the runtime reads it without numpy or torch.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .report import _decode, _encode

MANIFEST_KEY = "certificate"
GATED = ("kl", "kl_p99", "top1", "ppl_ratio")


@dataclass(frozen=True)
class AccuracyCertificate:
    """Teacher-forced metrics of an artifact vs its fp32 torch reference, and the verdict."""

    passed: bool
    scheme: str                     # "fp32" | "fp16" | "int8-weight" | "int8-sq" | "int4-awq" | ...
    backend: str                    # the backend that ran the artifact ("onnxruntime" | "tensorrt")
    tokens: int                     # positions scored (predicted tokens)
    windows: int
    window_tokens: int              # longest window fed in one prefill (incl. BOS)
    text_source: str                # "builtin:..." | a file path | "sampled-from-reference:..."
    text_sha256: str
    kl: float                       # mean KL(p_ref || p_artifact), nats
    kl_p99: float
    kl_max: float
    top1: float                     # fraction of positions with the same argmax
    ppl_reference: float
    ppl_candidate: float
    ppl_ratio: float                # ppl_candidate / ppl_reference
    thresholds: dict[str, float]    # gate name -> threshold (kl/kl_p99/ppl_ratio: <=, top1: >=)
    failures: tuple[str, ...] = ()
    greedy_agreement: float | None = None          # information, not a gate
    greedy_first_divergence: int | None = None
    greedy_margin_at_divergence: float | None = None  # reference top-2 logit gap there
    reference: str = ""             # checkpoint path
    validated: str = ""             # ISO date (UTC) of the validation
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return _encode(self)

    @classmethod
    def from_dict(cls, data: dict) -> "AccuracyCertificate":
        return _decode(cls, data)

    def summary(self) -> str:
        """One line: ``verified: KL 0.0012, top-1 98.1% on 2,140 tokens (validate 2026-12-01)``."""
        head = "verified" if self.passed else "validate FAILED"
        return (f"{head}: KL {self.kl:.2g}, top-1 {self.top1:.1%}, ppl x{self.ppl_ratio:.3f} on {self.tokens:,} "
                f"tokens ({self.scheme}, {self.backend}, validate {self.validated or '?'})")


def certificate_from_manifest(manifest: dict) -> AccuracyCertificate | None:
    """The certificate a manifest dict carries, or None (absent or unreadable: never fatal)."""
    data = (manifest or {}).get(MANIFEST_KEY)
    if not isinstance(data, dict):
        return None
    try:
        return AccuracyCertificate.from_dict(data)
    except (TypeError, ValueError, KeyError):
        return None


def read_certificate(folder) -> AccuracyCertificate | None:
    path = Path(folder) / "manifest.json"
    try:
        return certificate_from_manifest(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def write_certificate(folder, certificate: AccuracyCertificate) -> Path:
    """Put ``certificate`` into ``folder/manifest.json`` (temp file in the folder, then rename)."""
    path = Path(folder) / "manifest.json"
    data = json.loads(path.read_text())
    data[MANIFEST_KEY] = certificate.to_dict()
    fd, tmp = tempfile.mkstemp(prefix=".manifest.", suffix=".json.tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(data, indent=2, allow_nan=False))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


__all__ = ["AccuracyCertificate", "GATED", "MANIFEST_KEY", "certificate_from_manifest", "read_certificate",
           "write_certificate"]
