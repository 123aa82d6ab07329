"""TensorRT plugin ``llama_trt::RMSNorm`` as a quickly deployable plugin (``tensorrt.plugin``).

The ONNX node ``llama_trt.RMSNorm(x, weight) -> y`` with attribute ``epsilon`` (ONNX FLOAT,
which the parser hands over as a one-element FLOAT32 field) maps to this plugin: name =
op type ``RMSNorm``, namespace = domain ``llama_trt``, version "1".

Two implementations, chosen by :func:`register_plugins`:

* ``aot`` (default): ``@trtp.aot_impl`` compiles the Triton kernel of :mod:`.kernel` to PTX
  with ``triton.compile`` at engine-build time; TensorRT embeds the PTX in the engine, so the
  engine runs without Python (trtexec, C++). Attributes become compile-time constants.
* ``jit``: ``@trtp.impl`` launches the kernel from Python at run time (needs Python, torch
  and triton in the serving process).
* ``both``: registers both; the network must then be created with
  ``NetworkDefinitionCreationFlag.PREFER_AOT_PYTHON_PLUGINS`` (or ``PREFER_JIT_...``),
  otherwise TensorRT refuses to choose.

Facts about ``tensorrt.plugin`` this relies on (read from the 10.x/11.x module source):

* ``register`` reads real annotation objects (``inspect.signature``), so this module must
  not use ``from __future__ import annotations``. Attribute annotations decide the plugin
  field types: builtin ``float``/``int`` would declare FLOAT64/INT64 fields, so the
  attributes are declared ``npt.NDArray[np.float32]`` / ``npt.NDArray[np.int32]`` to match
  what the ONNX parser sends (FLOAT -> FLOAT32, INT -> INT32, one element).
* The AOT plugin calls ``aot_impl(*inputs, *all_attrs, outputs, tactic)`` -- every attribute,
  in registration order -- and launches the PTX kernel with arguments
  ``(input pointers..., extra int32 scalars..., output pointers...)``; the kernels of this
  package use exactly that order. Only ``SymInt32`` extra arguments exist (no floats), so
  ``epsilon`` is a ``tl.constexpr``.
* Triton >= 3.3 appends hidden ``global_scratch``/``profile_scratch`` pointer parameters to
  every kernel, which TensorRT does not pass. When the kernel does not use them (scratch
  sizes 0, no references in the PTX) they are removed from the PTX entry, so the PTX
  signature is exactly what TensorRT launches; otherwise compilation is refused.
* Plugin attributes are not serialized into an engine built with the AOT implementation.
"""

# NOTE: no ``from __future__ import annotations`` here (see above).

import re
import threading
from typing import Dict, List, NamedTuple, Sequence, Tuple, Union

import numpy as np
import numpy.typing as npt

PLUGIN_NAMESPACE = "llama_trt"
PLUGIN_NAME = "RMSNorm"
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"

_MODES = ("aot", "jit", "both")
_LOCK = threading.Lock()
_STATE: Dict[str, object] = {"defined": False, "impls": set()}
# Triton GPUTarget to compile the AOT kernels for; None = the current CUDA device.
_AOT_TARGET = {"target": None}

__all__ = [
    "PLUGIN_ID",
    "CompiledKernel",
    "build_rms_norm_ptx",
    "compile_triton_to_ptx",
    "register_plugins",
    "strip_unused_trailing_params",
    "trt_dtype_to_triton",
]


# ----------------------------------------------------------------------------- helpers
# (also used by the RoPE plugin)


class CompiledKernel(NamedTuple):
    name: str          # PTX entry name
    ptx: str
    block_x: int       # threads per block = num_warps * warp size
    shared_mem: int    # dynamic shared memory in bytes


def trt_dtype_to_triton(dtype) -> str:
    """Triton pointer element type string ("fp32", "fp16", "bf16", "i64", "i32") of a TensorRT dtype."""
    import tensorrt as trt

    table = {
        trt.float32: "fp32",
        trt.float16: "fp16",
        trt.bfloat16: "bf16",
        trt.int64: "i64",
        trt.int32: "i32",
    }
    if dtype not in table:
        raise TypeError(f"llama_trt plugins: unsupported TensorRT dtype {dtype}")
    return table[dtype]


def strip_unused_trailing_params(ptx: str, entry: str, n_params: int) -> str:
    """Drop the PTX entry parameters after the first ``n_params`` if the body never uses them.

    Triton appends scratch-pointer parameters that TensorRT's AOT launch does not supply.
    """
    m = re.search(r"(\.entry\s+" + re.escape(entry) + r"\s*\()(.*?)(\))", ptx, flags=re.S)
    if m is None:
        raise ValueError(f"PTX has no entry named {entry!r}")
    params = [p.strip() for p in m.group(2).split(",") if p.strip()]
    if len(params) < n_params:
        raise ValueError(f"PTX entry {entry} has {len(params)} parameters, expected at least {n_params}")
    if len(params) == n_params:
        return ptx
    body = ptx[: m.start()] + ptx[m.end():]
    for p in params[n_params:]:
        pname = p.split()[-1]
        if re.search(r"\b" + re.escape(pname) + r"\b", body):
            raise ValueError(
                f"Triton kernel {entry} uses its hidden parameter {pname} (global/profile scratch); "
                "TensorRT's AOT launch cannot supply it. Simplify the kernel or use the JIT implementation."
            )
    new_params = ",\n".join("\t" + p for p in params[:n_params])
    return ptx[: m.start(2)] + "\n" + new_params + "\n" + ptx[m.end(2):]


def compile_triton_to_ptx(
    fn,
    signature: Dict[str, str],
    constexprs: Dict[str, object],
    *,
    num_warps: int,
    n_launch_params: int,
    aligned: Sequence[str] = (),
    target=None,
) -> CompiledKernel:
    """Compile a ``@triton.jit`` function to PTX for a TensorRT AOT plugin.

    ``signature`` lists every kernel argument in order ("*fp16", "i32", ... or "constexpr");
    ``constexprs`` gives the constexpr values (``None`` drops an optional pointer argument);
    ``n_launch_params`` is how many arguments TensorRT passes (inputs + extra scalars +
    outputs); ``aligned`` names arguments known to be 16-byte aligned / divisible by 16
    (enables vectorized memory access); ``target`` is a ``triton.backends.compiler.GPUTarget``
    (``None``: the current CUDA device).
    """
    import triton
    from triton.compiler import ASTSource

    if target is None:
        target = _AOT_TARGET["target"]
    names = list(signature)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    try:
        src = ASTSource(fn=fn, signature=dict(signature), constexprs=dict(constexprs), attrs=attrs)
    except TypeError:  # triton < 3.3: constexprs are not part of the signature
        runtime_sig = {k: v for k, v in signature.items() if v != "constexpr"}
        src = ASTSource(fn=fn, signature=runtime_sig, constants=dict(constexprs))
    compiled = triton.compile(src, target=target, options={"num_warps": int(num_warps)})
    md = compiled.metadata
    for field in ("global_scratch_size", "profile_scratch_size"):
        if int(getattr(md, field, 0) or 0):
            raise ValueError(f"Triton kernel {md.name} needs {field}={getattr(md, field)}; unsupported in TensorRT AOT")
    ptx = compiled.asm["ptx"]
    ptx = strip_unused_trailing_params(ptx, md.name, n_launch_params)
    warp = int(getattr(md, "warp_size", 32) or 32)
    return CompiledKernel(md.name, ptx, int(md.num_warps) * warp, int(md.shared))


def static_dim(desc, axis: int, what: str) -> int:
    """A dimension that must be a build-time constant (or min == max in the profile)."""
    se = desc.shape_expr[axis]
    if not se.is_fake and se.is_constant:
        return int(se.constant_value())
    try:
        shape = desc.shape
        d = int(shape[axis])
        if d >= 0:
            return d
        lo, hi = shape.min[axis], shape.max[axis]
        if lo == hi:
            return int(lo)
    except Exception:  # noqa: BLE001 - shape may be unavailable at this stage
        pass
    raise ValueError(f"{what} (axis {axis}) must be static for the AOT kernel; make it a fixed dimension in the ONNX model")


def _row_count_expr(desc):
    """Symbolic product of all but the last dimension (rows of a [..., hidden] tensor); 1 for 1-D."""
    exprs = desc.shape_expr
    rows = None
    for i in range(len(exprs) - 1):
        rows = exprs[i] if rows is None else rows * exprs[i]
    return 1 if rows is None else rows


# ----------------------------------------------------------------------------- kernel build


def build_rms_norm_ptx(
    x_dtype: str,
    w_dtype: str,
    n_cols: int,
    eps: float,
    *,
    has_residual: bool = False,
    target=None,
) -> Tuple[CompiledKernel, "object"]:
    """PTX of the RMSNorm kernel for TensorRT: args ``X, W, n_rows:i32, n_cols:i32, Y``
    (``X, R, W, n_rows, n_cols, Y, S`` when ``has_residual``). Returns (kernel, launch config);
    the grid is ``cdiv(n_rows, cfg.BLOCK_M)``. Needs no TensorRT (usable for tests)."""
    from .kernel import get_rms_norm_kernel, rms_norm_launch_config

    # rows are only known at run time: size the tile for many rows
    cfg = rms_norm_launch_config(1 << 20, int(n_cols))
    ptr = f"*{x_dtype}"
    signature = {
        "X": ptr,
        "R": ptr if has_residual else "constexpr",
        "W": f"*{w_dtype}",
        "n_rows": "i32",
        "n_cols": "i32",
        "Y": ptr,
        "S": ptr if has_residual else "constexpr",
        "EPS": "constexpr",
        "HAS_RESIDUAL": "constexpr",
        "BLOCK_M": "constexpr",
        "BLOCK_N": "constexpr",
        "SINGLE_PASS": "constexpr",
    }
    constexprs = {
        "EPS": float(np.float32(eps)),
        "HAS_RESIDUAL": bool(has_residual),
        "BLOCK_M": cfg.BLOCK_M,
        "BLOCK_N": cfg.BLOCK_N,
        "SINGLE_PASS": cfg.SINGLE_PASS,
    }
    if not has_residual:
        constexprs.update({"R": None, "S": None})
    aligned = ["X", "W", "Y"] + (["R", "S"] if has_residual else [])
    if n_cols % 16 == 0:
        aligned.append("n_cols")
    n_params = 7 if has_residual else 5
    kernel = compile_triton_to_ptx(
        get_rms_norm_kernel(),
        signature,
        constexprs,
        num_warps=cfg.num_warps,
        n_launch_params=n_params,
        aligned=aligned,
        target=target,
    )
    return kernel, cfg


# ----------------------------------------------------------------------------- registration


def _define(trtp, trt):
    """``register`` + ``autotune`` (once per process)."""

    @trtp.register(PLUGIN_ID)
    def rms_norm_desc(x: trtp.TensorDesc, weight: trtp.TensorDesc, epsilon: npt.NDArray[np.float32]) -> trtp.TensorDesc:
        return x.like()

    @trtp.autotune(PLUGIN_ID)
    def rms_norm_autotune(
        x: trtp.TensorDesc, weight: trtp.TensorDesc, outputs: Tuple[trtp.TensorDesc]
    ) -> List[trtp.AutoTuneCombination]:
        # x and y share one type; the weight may independently be any float type
        # (the kernel casts it to x's dtype, as the eager op does). Linear layout only.
        return [trtp.AutoTuneCombination("FP32|FP16|BF16, FP32*FP16*BF16, FP32|FP16|BF16", "LINEAR")]


def _define_aot(trtp, trt):
    @trtp.aot_impl(PLUGIN_ID)
    def rms_norm_aot_impl(
        x: trtp.TensorDesc,
        weight: trtp.TensorDesc,
        epsilon: npt.NDArray[np.float32],
        outputs: Tuple[trtp.TensorDesc],
        tactic: int,
    ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
        n_cols = static_dim(x, len(x.shape_expr) - 1, "RMSNorm hidden size")
        eps = float(np.asarray(epsilon, dtype=np.float32).reshape(-1)[0])
        kernel, cfg = build_rms_norm_ptx(trt_dtype_to_triton(x.dtype), trt_dtype_to_triton(weight.dtype), n_cols, eps)
        n_rows = _row_count_expr(x)

        launch = trtp.KernelLaunchParams()
        launch.grid_x = trtp.cdiv(n_rows, cfg.BLOCK_M) if not isinstance(n_rows, int) else -(-n_rows // cfg.BLOCK_M)
        launch.block_x = kernel.block_x
        launch.shared_mem = kernel.shared_mem
        extra_args = trtp.SymIntExprs.from_tuple([trtp.SymInt32(n_rows), trtp.SymInt32(n_cols)])
        return kernel.name.encode(), kernel.ptx.encode(), launch, extra_args


def _define_jit(trtp, trt):
    @trtp.impl(PLUGIN_ID)
    def rms_norm_impl(
        x: trtp.Tensor,
        weight: trtp.Tensor,
        epsilon: npt.NDArray[np.float32],
        outputs: Tuple[trtp.Tensor],
        stream: int,
    ) -> None:
        import torch

        from .kernel import rms_norm_triton

        eps = float(np.asarray(epsilon, dtype=np.float32).reshape(-1)[0])
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            x_t = torch.as_tensor(x, device="cuda")
            w_t = torch.as_tensor(weight, device="cuda")
            out_t = torch.as_tensor(outputs[0], device="cuda")
            out_t.copy_(rms_norm_triton(x_t, w_t, eps))


def register_plugins(mode: str = "aot", target=None) -> str:
    """Register ``llama_trt::RMSNorm`` with TensorRT's plugin registry. Idempotent.

    Args:
        mode: "aot" (default; PTX embedded in the engine), "jit" (Python at run time), or
            "both" (then create the network with PREFER_AOT_PYTHON_PLUGINS / PREFER_JIT_...).
            A later call with another mode adds the missing implementation; none is removed.
        target: optional ``triton.backends.compiler.GPUTarget`` for the AOT PTX
            (default: the GPU TensorRT builds on).

    Returns the plugin id. Raises :class:`llama_trt.errors.BackendUnavailableError` when
    ``tensorrt.plugin`` (or, for "aot", TensorRT's AOT plugin support) is missing.
    """
    if mode not in _MODES:
        raise ValueError(f"register_plugins: mode must be one of {_MODES}, got {mode!r}")
    trtp, trt = _import_trt_plugin(mode)
    with _LOCK:
        if target is not None:
            _AOT_TARGET["target"] = target
        if not _STATE["defined"]:
            if not _already_defined(trtp):
                _define(trtp, trt)
            _STATE["defined"] = True
        wanted = {"aot", "jit"} if mode == "both" else {mode}
        for impl in sorted(wanted - _STATE["impls"]):
            (_define_aot if impl == "aot" else _define_jit)(trtp, trt)
            _STATE["impls"].add(impl)
    return PLUGIN_ID


def _already_defined(trtp) -> bool:
    # e.g. this module was reloaded: tensorrt.plugin refuses a second `register`
    try:
        return hasattr(getattr(trtp.op, PLUGIN_NAMESPACE), PLUGIN_NAME)
    except AttributeError:
        return False


def _import_trt_plugin(mode: str):
    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp
    except Exception as e:  # noqa: BLE001 - ImportError or a missing libnvinfer
        from ...errors import BackendUnavailableError

        raise BackendUnavailableError(
            f"TensorRT Python plugins need full TensorRT with `tensorrt.plugin` (10.7+): {e}. "
            "Install TensorRT from NVIDIA's index or JetPack, or build without the plugin "
            "(lower the fused ops to their ONNX function bodies)."
        ) from e
    if mode in ("aot", "both") and not hasattr(trt, "QuickPluginCreationRequest"):
        from ...errors import BackendUnavailableError

        raise BackendUnavailableError(
            f"TensorRT {getattr(trt, '__version__', '?')} has no AOT Python plugins (need 10.9+); "
            "use register_plugins(mode='jit') or upgrade TensorRT."
        )
    return trtp, trt
