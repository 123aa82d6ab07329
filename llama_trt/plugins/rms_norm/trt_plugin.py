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

The registration machinery, the Triton -> PTX helpers and the ``tensorrt.plugin`` facts
they rely on (real annotations, AOT launch argument order, Triton's hidden scratch parameters)
live in :mod:`llama_trt.plugins.trt_support`. ``epsilon`` is a float attribute, so the AOT
kernel takes it as a ``tl.constexpr``.
"""

# NOTE: no ``from __future__ import annotations``: tensorrt.plugin inspects real annotations.

from typing import List, Tuple, Union

import numpy as np
import numpy.typing as npt

from ..trt_support import (
    CompiledKernel,
    PluginRegistration,
    aot_launch,
    compile_triton_to_ptx,
    static_dim,
    strip_unused_trailing_params,  # noqa: F401 - re-exported: tests import it from here
    trt_dtype_to_triton,
)

PLUGIN_NAMESPACE = "llama_trt"
PLUGIN_NAME = "RMSNorm"
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"

__all__ = ["PLUGIN_ID", "build_rms_norm_ptx", "register_plugins"]


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


def _row_count_expr(desc):
    """Symbolic product of all but the last dimension (rows of a [..., hidden] tensor); 1 for 1-D."""
    exprs = desc.shape_expr
    rows = None
    for i in range(len(exprs) - 1):
        rows = exprs[i] if rows is None else rows * exprs[i]
    return 1 if rows is None else rows


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
        return aot_launch(trtp, kernel, launch, (n_rows, n_cols))


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


_REGISTRATION = PluginRegistration(PLUGIN_NAMESPACE, PLUGIN_NAME, _define, _define_aot, _define_jit)


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
    return _REGISTRATION.register(mode, target)
