"""ONNX Runtime's kernel block for an int8-weight export, chosen by the export's own certificate.

The export keeps its int8 weights per output channel (TensorRT's INT8 weight form). ONNX Runtime
runs each one as an 8-bit ``MatMulNBits`` that rounds its activation to int8 with one scale per
block of K; the session can hand it the same weights in blocks of 32 (ORT's own choice), 64 or
128 (``runtime/sessions/ort_pack.int8_kernel_blocks``). A wider block is faster and rounds the
activations more coarsely (SmolLM2-135M, decode on 2 threads: +3-7% at 64; certificate KL
0.0033 -> 0.0039 at 64, 0.0051 at 128). So the choice is the export's, made here after
quantization: ``--int8-kernel-block auto`` (the default) certifies blocks of 32 and then of
:data:`AUTO_BLOCK`, and keeps the wider one only when its certificate passes the scheme's gate;
a number is taken as given and certified. Both trials go into the manifest
(``quantization.ort_kernel``) and the kept block's certificate is the export's certificate, so
``validate``, ``run`` and ``serve`` open the session the certificate measured.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

#: the block ``auto`` tries after 32 (128 pads K=576 to 640 and failed SmolLM2's gate: KL 0.0051)
AUTO_BLOCK = 64
KEY = "ort_kernel"


@dataclass(frozen=True)
class KernelTrial:
    block: int
    kl: float
    top1: float
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return {"int8_block": self.block, "kl": self.kl, "top1": self.top1, "passed": self.passed}


def initial_record(scheme: str, requested: int | None) -> dict[str, Any] | None:
    """``quantization.ort_kernel`` as quantization leaves it (None: no per-channel int8 weights in play)."""
    if scheme != "int8-weight":
        return None
    return {"int8_block": requested or 32, "requested": requested or "auto",
            "chosen_by": "--int8-kernel-block" if requested else "ONNX Runtime's own (not certified)", "trials": []}


def choose(requested: "int | str", trials: list[KernelTrial]) -> KernelTrial:
    """The trial to keep: the requested block, or (auto) the widest whose certificate passes, else the first."""
    if requested != "auto":
        return next(t for t in trials if t.block == int(requested))
    passing = [t for t in trials if t.passed]
    return max(passing, key=lambda t: t.block) if passing else trials[0]


def certify_kernel_blocks(folder: Path, ckpt, manifest, *, progress: bool = False):
    """Certify ``folder`` (an int8-weight export) at the kernel block(s) its record asks for, keep
    the chosen one in its manifest (returned, and written) with that block's certificate."""
    from ..exporter.manifest import MANIFEST_NAME
    from ..validate.reference import reference_for
    from ..validate.teacher_forced import certify

    record = dict(manifest.quantization[KEY])
    requested = record["requested"]
    reference = reference_for(ckpt, None)  # the fp32 logits of the text, computed once for every trial
    blocks = [32, AUTO_BLOCK] if requested == "auto" else [int(requested)]
    certs = {}
    for block in blocks:
        certs[block] = certify(folder, ckpt, scheme=manifest.quantization["scheme"], progress=progress,
                               reference=reference, session_options={"int8_block": block})
        if not certs[block].passed:
            break  # a wider block only rounds more coarsely
    trials = [KernelTrial(b, round(c.kl, 6), round(c.top1, 5), c.passed) for b, c in certs.items()]
    kept = choose(requested, trials)
    record.update(int8_block=kept.block, trials=[t.to_dict() for t in trials],
                  chosen_by="--int8-kernel-block" if requested != "auto" else
                  "the widest block whose certificate passes" if kept.passed else "none passed: ONNX Runtime's own")
    manifest = replace(manifest, quantization={**manifest.quantization, KEY: record},
                       certificate=certs[kept.block].to_dict())
    (folder / MANIFEST_NAME).write_text(manifest.to_json())
    return manifest


def describe(record: dict[str, Any] | None) -> str | None:
    """One line for ``export``'s summary, or None."""
    if not isinstance(record, dict) or not record.get("trials"):
        return None
    tried = "; ".join(f"blocks of {t['int8_block']}: KL {t['kl']:.2g}, top-1 {t['top1']:.1%}"
                      f"{'' if t['passed'] else ' (misses the gate)'}" for t in record["trials"])
    return f"ONNX Runtime int8 kernel: blocks of {record['int8_block']} ({record['chosen_by']}; {tried})"


__all__ = ["AUTO_BLOCK", "KernelTrial", "certify_kernel_blocks", "choose", "describe", "initial_record"]
