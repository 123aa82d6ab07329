"""ONNX Runtime's kernel form for a quantized export, chosen by the export's own certificate.

The export's file is what TensorRT builds; an ONNX Runtime session runs a rewritten graph of it
(``runtime/sessions/ort_lowering``) whose quantized kernels can take a faster, less exact form
(:class:`~.schemes.OrtKernelForm`):

* int8-weight keeps its int8 weights per output channel. ONNX Runtime runs each one as an 8-bit
  ``MatMulNBits`` that rounds its activation to int8 with one scale per block of K; the session
  can hand it the same weights in blocks of 32 (ORT's own), 64 or 128
  (``ort_pack.int8_kernel_blocks``). SmolLM2-135M: +3-7% decode at 64, certificate KL 0.0033 ->
  0.0039 (0.0051 at 128).
* int4 schemes keep the lm head int8, and the session rescores its best logits from the int8
  weights (``ort_head``). The candidates can be found with an int4 copy of the head instead
  (``ort_head.int4_head_scan``), half the bytes read per token: blocks of 64 along K, 64 candidates
  rescored (exports certified before the block was recorded: blocks of 32, 32 rescored). SmolLM2
  int4-awq: KL 0.267 -> 0.299 (blocks of 32: 0.297, 5% slower decode).

So the choice is the export's, made here after quantization. The candidate forms run from the
fastest to ONNX Runtime's own; each is certified in turn, and the first whose certificate passes
the scheme's gate is kept (none: the last, the most accurate). An option that names a value
(``--int8-kernel-block``, ``--head-scan-bits``) leaves one candidate, kept as given. The trials go
into the manifest (``quantization.ort_kernel``) and the kept form's certificate is the export's,
so ``validate``, ``run`` and ``serve`` open the session the certificate measured.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from .schemes import OrtKernelForm

#: the int8 block tried first (128 pads K=576 to 640 and failed SmolLM2's gate: KL 0.0051)
AUTO_BLOCK = 64
KEY = "ort_kernel"
_OPTIONS = {"int8_block": "--int8-kernel-block", "head_scan_bits": "--head-scan-bits"}


@dataclass(frozen=True)
class KernelTrial:
    form: OrtKernelForm
    kl: float
    top1: float
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self.form), "kl": self.kl, "top1": self.top1, "passed": self.passed}


def candidates(scheme: str, lm_head: str | None, requested: dict[str, int]) -> list[OrtKernelForm]:
    """The forms to certify, fastest first ([]: the export has no choice to make). ``lm_head``:
    the manifest's ``"int8"`` / ``"int4"`` / ``"float"``; ``requested``: the values options named."""
    if scheme == "int8-weight":
        blocks = [requested["int8_block"]] if "int8_block" in requested else [AUTO_BLOCK, 32]
        return [OrtKernelForm(int8_block=b) for b in blocks]
    if scheme.startswith("int4") and lm_head == "int8":
        bits = [requested["head_scan_bits"]] if "head_scan_bits" in requested else [4, 8]
        return [OrtKernelForm(head_scan_bits=b) for b in bits]
    return []


def initial_record(scheme: str, lm_head: str | None, requested: dict[str, int]) -> dict[str, Any] | None:
    """``quantization.ort_kernel`` as quantization leaves it: the most accurate candidate, not yet
    certified (None: no choice to make)."""
    forms = candidates(scheme, lm_head, requested)
    if not forms:
        return None
    return {**asdict(forms[-1]), "requested": dict(requested) or "auto",
            "chosen_by": _chosen_by(requested, None), "trials": []}


def _chosen_by(requested: dict[str, int], kept: KernelTrial | None) -> str:
    if requested:
        return ", ".join(_OPTIONS[k] for k in requested)
    if kept is None:
        return "ONNX Runtime's own (not certified)"
    return "the fastest form whose certificate passes" if kept.passed else "none passed: the most accurate"


def certify_kernel_forms(folder: Path, ckpt, manifest, *, progress: bool = False, reference=None):
    """Certify ``folder`` at its candidate forms, fastest first, until one passes; keep that one
    (or the last) in its manifest, returned and written, with its certificate. ``reference``: a
    :class:`~llama_trt.validate.reference.TorchReference` of ``ckpt`` to share (None: one for these trials)."""
    from ..exporter.manifest import MANIFEST_NAME
    from ..validate.reference import reference_for
    from ..validate.teacher_forced import certify

    quant = manifest.quantization
    record = dict(quant[KEY])
    requested = record.get("requested")
    requested = requested if isinstance(requested, dict) else {} if requested == "auto" else {"int8_block": requested}
    reference = reference_for(ckpt, reference)  # the fp32 logits of the text, computed once for every trial
    trials, cert = [], None
    for form in candidates(quant["scheme"], quant.get("lm_head"), requested):
        cert = certify(folder, ckpt, scheme=quant["scheme"], progress=progress, reference=reference,
                       session_options=asdict(form))
        trials.append(KernelTrial(form, round(cert.kl, 6), round(cert.top1, 5), cert.passed))
        if cert.passed:
            break
    kept = trials[-1]
    record.update(**asdict(kept.form), trials=[t.to_dict() for t in trials], chosen_by=_chosen_by(requested, kept))
    manifest = replace(manifest, quantization={**quant, KEY: record}, certificate=cert.to_dict())
    (folder / MANIFEST_NAME).write_text(manifest.to_json())
    return manifest


def describe_form(form: OrtKernelForm) -> str:
    parts = []
    if form.int8_block != 32:
        parts.append(f"int8 weights in kernel blocks of {form.int8_block}")
    if form.head_scan_bits != 8:
        parts.append(f"lm head candidates found by an int{form.head_scan_bits} copy in blocks of {form.head_scan_block}")
    return ", ".join(parts) or "ONNX Runtime's own"


def describe(record: dict[str, Any] | None) -> str | None:
    """One line for ``export``'s summary, or None."""
    if not isinstance(record, dict) or not record.get("trials"):
        return None
    tried = "; ".join(f"{describe_form(OrtKernelForm.from_record(t))}: KL {t['kl']:.2g}, top-1 {t['top1']:.1%}"
                      f"{'' if t['passed'] else ' (misses the gate)'}" for t in record["trials"])
    return f"ONNX Runtime kernels: {describe_form(OrtKernelForm.from_record(record))} ({record['chosen_by']}; {tried})"


__all__ = ["AUTO_BLOCK", "KEY", "KernelTrial", "candidates", "certify_kernel_forms", "describe", "describe_form",
           "initial_record"]
