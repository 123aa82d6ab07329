"""Quantization schemes as data, and the options of one quantization run.

Each scheme is a frozen :class:`Scheme` (weight bits, granularity, zero points, whether
activations are quantized, which search runs, whether TensorRT builds it). The manifest
records :meth:`Scheme.to_dict`, so an artifact says exactly what it holds.

==============  =====================================================================
``int8-weight``  W8A16: int8 weights, one symmetric scale per output channel
                 (``DequantizeLinear(axis=1)`` on a ``[K, N]`` MatMul weight), after AWQ's
                 activation-aware scale search (exact folds only; alpha 0 = plain rounding),
                 rounded by GPTQ on 128 x 64 calibration tokens.
``int8-sq``      W8A8 SmoothQuant: int8 per-channel weights and per-tensor int8
                 activations; refused when it misses its KL target (see smoothquant.py).
``int4-awq``     W4A16: int4 weights in blocks of ``group_size`` along the input
                 dimension (``DequantizeLinear(axis=0, block_size=g)``), after AWQ's
                 activation-aware scale and clipping search on calibration text.
``int4-rtn``     the same storage, plain round-to-nearest (AWQ's baseline).
==============  =====================================================================

The lm head of the weight-only schemes is int8 in blocks of 32 along K by default
(:data:`HEAD_INT8_BLOCK`); int8-sq keeps it float.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..errors import ExportError
from .calibration import DEFAULT_SAMPLES, DEFAULT_SEQ_LEN, check_calibration_file

DEFAULT_ALPHA = 0.5
GPTQ_SAMPLES = 128  # x 64 tokens: SmolLM2 int8-weight KL 0.0038 with 16 sequences, 0.0032 with 128 (gptq.py)
DEFAULT_GROUP = 64
GROUP_SIZES = (32, 64, 128)
# The block sizes offered for TensorRT INT4 weight-only (ModelOpt's int4_awq uses 128; DESIGN.md: a
# g64 DQ -> MatMul built by TensorRT-RTX 1.7.1 stayed int4). Not re-verified by a build in this change.
TENSORRT_INT4_GROUPS = (32, 64, 128)
# An int8 lm head keeps one scale per block of 32 rows along K, not per output channel: on SmolLM2
# per channel cost the head alone KL 0.00083 / top-1 97.2%, blocks of 64 0.00021 / 98.8%
# (benchmarks/probe_head_int8.py), and ONNX Runtime runs both as the same 8-bit block-32
# MatMulNBits. TensorRT-RTX 1.7.1 builds DQ(int8 [K, N], scale [K/32, N], axis=0, block_size=32)
# -> MatMul with the weights int8 in the plan (checked ahead of time on the CPU); full TensorRT: unchecked.
HEAD_INT8_BLOCK = 32


#: the blocks the session can give ONNX Runtime's 8-bit ``MatMulNBits`` kernel for a per-channel int8
#: weight (runtime/sessions/ort_pack.int8_kernel_blocks; ORT's own fusion takes 32; each checked on
#: x86 ORT 1.32, tests/quantize/test_kernel_form.py)
INT8_KERNEL_BLOCKS = (32, 64, 128)
#: the weights an ONNX Runtime session finds an int8 lm head's candidates with: 8 = the head itself,
#: 4 = an int4 copy of it in blocks of :data:`HEAD_SCAN_BLOCK` (runtime/sessions/ort_head.int4_head_scan;
#: the candidates are rescored from the int8 weights either way)
HEAD_SCAN_BITS = (4, 8)
#: the int4 copy's blocks along K. On SmolLM2 int4-awq (certificate KL 0.267 with the int8 scan):
#: blocks of 32 with 32 candidates rescored 0.297 / perplexity x1.325 (what exports certified before
#: the block was recorded used), blocks of 64 with 64 rescored 0.299 / x1.323 and 5% faster decode
#: (half the scales to read; 16 rescored missed the perplexity gate). Zero points: 0.294 but slower;
#: clipping each block to its least-squares range 0.350 (the head's large weights rank the tokens).
#: The number rescored goes with the block: ort_head.SCAN_RESCORE_K.
HEAD_SCAN_BLOCKS = (32, 64)
#: the block a new export's int4 scan is certified with
HEAD_SCAN_BLOCK = 64


@dataclass(frozen=True)
class OrtKernelForm:
    """How an ONNX Runtime CPU session runs an export's quantized weights. The export's file is
    the same either way; the session graph (runtime/sessions/ort_lowering) differs, and so do
    speed and accuracy, so the form is chosen by the export's certificate and recorded in its
    manifest (``quantization.ort_kernel``; quantize/kernel_form.py)."""

    int8_block: int = 32            # per-channel int8 weights handed to MatMulNBits in blocks of this
    head_scan_bits: int = 8         # an int8 lm head's candidates found with 8- or 4-bit weights
    head_scan_block: int = 0        # the 4-bit copy's block along K (0: HEAD_SCAN_BLOCK; none with 8 bits)

    def __post_init__(self) -> None:
        if self.int8_block not in INT8_KERNEL_BLOCKS:
            raise ValueError(f"int8 kernel block {self.int8_block} is not one of {INT8_KERNEL_BLOCKS}")
        if self.head_scan_bits not in HEAD_SCAN_BITS:
            raise ValueError(f"head scan bits {self.head_scan_bits} is not one of {HEAD_SCAN_BITS}")
        if self.head_scan_bits == 8:
            object.__setattr__(self, "head_scan_block", 0)
        elif not self.head_scan_block:
            object.__setattr__(self, "head_scan_block", HEAD_SCAN_BLOCK)
        elif self.head_scan_block not in HEAD_SCAN_BLOCKS:
            raise ValueError(f"head scan block {self.head_scan_block} is not one of {HEAD_SCAN_BLOCKS}")

    @classmethod
    def from_record(cls, record) -> "OrtKernelForm":
        """The form a manifest's ``quantization.ort_kernel`` records (fields it lacks: the defaults,
        which is how exports made before a field existed were certified). Bad values raise ValueError."""
        record = record if isinstance(record, dict) else {}
        values = {}
        for name in ("int8_block", "head_scan_bits", "head_scan_block"):
            value = record.get(name)
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ValueError(f"{name} {value!r} is not an integer")
                values[name] = value
        if values.get("head_scan_bits") == 4 and "head_scan_block" not in values:
            values["head_scan_block"] = 32  # recorded before the block was: certified with blocks of 32
        return cls(**values)

    def key(self) -> str:
        scan = f"head_scan_block={self.head_scan_block};" if self.head_scan_bits == 4 else ""
        return f"int8_block={self.int8_block};head_scan_bits={self.head_scan_bits};{scan}"


@dataclass(frozen=True)
class Scheme:
    """What a scheme stores and how it chooses its weights."""

    name: str
    weight_bits: int                    # 8 or 4
    group_size: int | None = None       # None: one scale per output channel; else a block along K
    symmetric: bool = True              # False: uint4 + zero points (int4 only)
    activations: bool = False           # W8A8: activations quantized per tensor too
    awq: bool = False                   # activation-aware scale + clip search
    calibrated: bool = False            # needs calibration text
    gptq: bool = False                  # GPTQ rounding (int8 per channel; see gptq.py)
    calib_samples: int = DEFAULT_SAMPLES  # default calibration sequences (GPTQ's Hessians want thousands of tokens)

    @property
    def weight_dtype(self) -> str:
        if self.weight_bits == 8:
            return "int8"
        return "int4" if self.symmetric else "uint4"

    @property
    def tensorrt(self) -> tuple[bool, str]:
        """(TensorRT / TensorRT-RTX build it as a quantized GEMM, why not)."""
        if self.weight_bits == 4 and not self.symmetric:
            return False, "TensorRT's IDequantizeLayer rejects non-zero INT4 zero points (use symmetric int4)"
        if self.weight_bits == 4 and self.group_size not in TENSORRT_INT4_GROUPS:
            return False, f"TensorRT INT4 block sizes are {TENSORRT_INT4_GROUPS}"
        return True, ""

    def to_dict(self) -> dict:
        ok, why = self.tensorrt
        return {**asdict(self), "weight_dtype": self.weight_dtype, "tensorrt": ok,
                **({"tensorrt_note": why} if why else {})}


SCHEMES: dict[str, Scheme] = {
    "int8-weight": Scheme("int8-weight", 8, awq=True, calibrated=True, gptq=True, calib_samples=GPTQ_SAMPLES),
    "int8-sq": Scheme("int8-sq", 8, activations=True, calibrated=True),
    "int4-awq": Scheme("int4-awq", 4, DEFAULT_GROUP, awq=True, calibrated=True),
    "int4-rtn": Scheme("int4-rtn", 4, DEFAULT_GROUP),
}
SCHEME_NAMES = tuple(SCHEMES)


@dataclass(frozen=True)
class QuantizeOptions:
    scheme: Scheme
    quantize_embeddings: bool = False
    quantize_lm_head: bool | None = None  # None: scheme default (int8 blocks of 32; int8-sq: float)
    sq_alpha: float = DEFAULT_ALPHA
    sq_target_kl: float | None = None   # None: the int8-sq certificate gate
    calib_data: Path | None = None
    calib_samples: int = DEFAULT_SAMPLES
    calib_seq_len: int = DEFAULT_SEQ_LEN
    seed: int = 0
    exclude: tuple[str, ...] = ()       # fnmatch patterns of module names kept in float
    certify: bool = True                # accuracy certificate after export (into the manifest)
    int8_kernel_block: int | None = None  # ONNX Runtime's kernel block of per-channel int8 weights; None: auto
    head_scan_bits: int | None = None   # int4 schemes: bits of the int8 head's candidate search on ORT; None: auto

    @property
    def name(self) -> str:
        return self.scheme.name

    # older names, kept for callers of exporter/quantize.py
    @property
    def embeddings(self) -> bool:
        return self.quantize_embeddings

    @property
    def lm_head(self) -> bool:
        """The head is quantized (at :attr:`head_bits`)."""
        return self.head_bits is not None

    @property
    def head_dtype(self) -> str:
        """What the manifest's ``lm_head`` says: "float", "int8" or "int4"."""
        return "float" if self.head_bits is None else f"int{self.head_bits}"

    @property
    def head_bits(self) -> int | None:
        """None: float. Default: int8 in blocks of 32 along K for the weight-only schemes (a 135M
        model's tied table is 40% of its weights, and the fp32 head doubled int8-weight's bytes per
        token; on ONNX Runtime its best logits are rescored in fp32, runtime/sessions/ort_head.py,
        which is what lets int8-weight meet its gate with it), float for int8-sq (W8A8 ruins it).
        ``--quantize-lm-head``: the scheme's bits; ``--no-quantize-lm-head``: float."""
        if self.quantize_lm_head is None:
            return None if self.scheme.activations else 8
        return self.scheme.weight_bits if self.quantize_lm_head else None

    def head_block(self, k: int) -> int | None:
        """Block along K of a weight-only int8 head of K inputs (None: per channel: 32 does not divide
        K, or int8-sq, whose head ONNX Runtime's quantizer writes per channel)."""
        blocked = self.head_bits == 8 and not self.scheme.activations and k % HEAD_INT8_BLOCK == 0
        return HEAD_INT8_BLOCK if blocked else None

    @property
    def activations(self) -> bool:
        return self.scheme.activations


def _scheme(name, group_size, zero_point) -> Scheme:
    if name not in SCHEMES:
        raise ExportError(f"unknown --quantize value {name!r}: choose one of {', '.join(SCHEMES)}")
    base = SCHEMES[name]
    if base.weight_bits != 4:
        if group_size is not None or zero_point:
            raise ExportError(f"--group-size / --int4-zero-point apply to int4 schemes, not {name}")
        return base
    g = DEFAULT_GROUP if group_size is None else group_size
    if g not in GROUP_SIZES:
        raise ExportError(f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))}, got {g}")
    return replace(base, group_size=int(g), symmetric=not zero_point)


def parse_options(scheme, *, quantize_embeddings=None, quantize_lm_head=None, sq_alpha=None, calib_data=None,
                  calib_samples=None, calib_seq_len=None, seed: int = 0, exclude=(), group_size=None,
                  int4_zero_point: bool = False, sq_target_kl=None, certify: bool = True,
                  int8_kernel_block=None, head_scan_bits=None) -> QuantizeOptions:
    """Check everything that can be checked before any export work; :class:`ExportError` otherwise."""
    if isinstance(scheme, QuantizeOptions):
        return scheme
    sch = scheme if isinstance(scheme, Scheme) else _scheme(scheme, group_size, int4_zero_point)
    alpha = DEFAULT_ALPHA if sq_alpha is None else sq_alpha
    try:
        alpha = float(alpha)
    except (TypeError, ValueError):
        raise ExportError(f"--sq-alpha must be a number in [0, 1], got {sq_alpha!r}") from None
    if not 0.0 <= alpha <= 1.0:
        raise ExportError(f"--sq-alpha must be in [0, 1], got {alpha}")
    if not sch.activations and (sq_alpha is not None and alpha != DEFAULT_ALPHA or sq_target_kl is not None):
        raise ExportError("--sq-alpha / --sq-target-kl only apply to --quantize int8-sq")
    if sq_target_kl is not None and not float(sq_target_kl) > 0:
        raise ExportError(f"--sq-target-kl must be > 0, got {sq_target_kl}")
    samples = sch.calib_samples if calib_samples is None else calib_samples
    seq_len = DEFAULT_SEQ_LEN if calib_seq_len is None else calib_seq_len
    if not isinstance(samples, int) or samples < 1:
        raise ExportError(f"--calib-samples must be a positive integer, got {calib_samples!r}")
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ExportError(f"calibration sequence length must be >= 2, got {calib_seq_len!r}")
    if calib_data is not None:
        if not sch.calibrated:
            raise ExportError(f"--calib-data only applies to calibrated schemes (int8-sq, int4-awq); "
                              f"{sch.name} needs no calibration")
        check_calibration_file(calib_data)
        calib_data = Path(calib_data)
    block = _kernel_block(sch, int8_kernel_block)
    options = QuantizeOptions(sch, bool(quantize_embeddings), None if quantize_lm_head is None else bool(quantize_lm_head),
                              alpha, None if sq_target_kl is None else float(sq_target_kl), calib_data, samples, seq_len,
                              seed, tuple(str(p) for p in (exclude or ())), bool(certify), block)
    return replace(options, head_scan_bits=_head_scan_bits(options, head_scan_bits))


def _head_scan_bits(options: QuantizeOptions, value) -> int | None:
    """``--head-scan-bits``: None / "auto" = chosen by the certificate (quantize/kernel_form.py)."""
    if value is None or value == "auto":
        return None
    if options.scheme.weight_bits != 4 or options.head_bits != 8:
        raise ExportError(f"--head-scan-bits applies to int4 schemes with the lm head int8 (their default), "
                          f"not {options.name} with the head {options.head_dtype}")
    return _one_of("--head-scan-bits", value, HEAD_SCAN_BITS)


def _kernel_block(sch: Scheme, value) -> int | None:
    """``--int8-kernel-block``: None / "auto" = chosen by the certificate (quantize/kernel_form.py)."""
    if value is None or value == "auto":
        return None
    if sch.name != "int8-weight":
        raise ExportError(f"--int8-kernel-block applies to --quantize int8-weight (its per-channel int8 weights), "
                          f"not {sch.name}")
    return _one_of("--int8-kernel-block", value, INT8_KERNEL_BLOCKS)


def _one_of(option: str, value, allowed: tuple[int, ...]) -> int:
    """A kernel-form option's value as an int from ``allowed`` (its other value, auto, handled by the caller)."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = None
    if number not in allowed:
        raise ExportError(f"{option} must be auto or one of {', '.join(map(str, allowed))}, got {value!r}")
    return number


__all__ = ["DEFAULT_ALPHA", "DEFAULT_GROUP", "GROUP_SIZES", "HEAD_INT8_BLOCK", "HEAD_SCAN_BITS", "HEAD_SCAN_BLOCK", "HEAD_SCAN_BLOCKS",
           "INT8_KERNEL_BLOCKS", "OrtKernelForm", "QuantizeOptions", "SCHEMES", "SCHEME_NAMES", "Scheme", "parse_options"]
