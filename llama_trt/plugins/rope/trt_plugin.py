"""TensorRT plugin ``llama_trt::RotaryEmbedding`` as a quickly deployable plugin (``tensorrt.plugin``).

ONNX node ``llama_trt.RotaryEmbedding(x, position_ids, inv_freq) -> y`` with attributes
``interleaved`` and ``rotary_dim`` (ONNX INT -> one-element INT32 fields) maps to this
plugin: name ``RotaryEmbedding``, namespace ``llama_trt``, version "1".

* x [batch, heads, seq, head_dim] float32/float16/bfloat16; head_dim must be static.
* position_ids int64 [batch, seq]; inv_freq float32 [rotary_dim / 2] (usually an initializer).
* y like x.

Implementations ("aot", "jit", "both") as described in
:mod:`llama_trt.plugins.rms_norm.trt_plugin`; registration, the Triton -> PTX helpers
(launch argument order ``inputs, int32 scalars, outputs``) and the ``tensorrt.plugin``
facts relied on are in :mod:`llama_trt.plugins.trt_support`.
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
    trt_dtype_to_triton,
)

PLUGIN_NAMESPACE = "llama_trt"
PLUGIN_NAME = "RotaryEmbedding"
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"

__all__ = ["PLUGIN_ID", "build_rope_ptx", "register_plugins"]


def _scalar(a) -> int:
    return int(np.asarray(a).reshape(-1)[0])


def build_rope_ptx(
    x_dtype: str,
    head_dim: int,
    rotary_dim: int,
    interleaved: bool,
    n_heads_hint: int = 32,
    *,
    target=None,
) -> Tuple[CompiledKernel, object]:
    """PTX of the RoPE kernel for TensorRT: args ``X, POS, INV_FREQ, n_heads:i32, seq_len:i32, Y``.

    Returns (kernel, launch config); the grid is ``(batch * seq, cdiv(n_heads, cfg.BLOCK_H))``.
    Needs no TensorRT (usable for tests)."""
    from .kernel import get_rope_kernel, rope_launch_config

    cfg = rope_launch_config(int(n_heads_hint), int(head_dim), int(rotary_dim))
    ptr = f"*{x_dtype}"
    signature = {
        "X": ptr,
        "POS": "*i64",
        "INV_FREQ": "*fp32",
        "n_heads": "i32",
        "seq_len": "i32",
        "Y": ptr,
        "HEAD_DIM": "constexpr",
        "ROT_DIM": "constexpr",
        "INTERLEAVED": "constexpr",
        "BLOCK_H": "constexpr",
        "BLOCK_HALF": "constexpr",
        "BLOCK_PASS": "constexpr",
    }
    constexprs = {
        "HEAD_DIM": int(head_dim),
        "ROT_DIM": int(rotary_dim),
        "INTERLEAVED": bool(interleaved),
        "BLOCK_H": cfg.BLOCK_H,
        "BLOCK_HALF": cfg.BLOCK_HALF,
        "BLOCK_PASS": cfg.BLOCK_PASS,
    }
    kernel = compile_triton_to_ptx(
        get_rope_kernel(),
        signature,
        constexprs,
        num_warps=cfg.num_warps,
        n_launch_params=6,
        aligned=["X", "POS", "INV_FREQ", "Y"],
        target=target,
    )
    return kernel, cfg


def _define(trtp, trt):
    @trtp.register(PLUGIN_ID)
    def rope_desc(
        x: trtp.TensorDesc,
        position_ids: trtp.TensorDesc,
        inv_freq: trtp.TensorDesc,
        interleaved: npt.NDArray[np.int32],
        rotary_dim: npt.NDArray[np.int32],
    ) -> trtp.TensorDesc:
        return x.like()

    @trtp.autotune(PLUGIN_ID)
    def rope_autotune(
        x: trtp.TensorDesc,
        position_ids: trtp.TensorDesc,
        inv_freq: trtp.TensorDesc,
        outputs: Tuple[trtp.TensorDesc],
    ) -> List[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination("FP32|FP16|BF16, INT64, FP32, FP32|FP16|BF16", "LINEAR")]


def _define_aot(trtp, trt):
    @trtp.aot_impl(PLUGIN_ID)
    def rope_aot_impl(
        x: trtp.TensorDesc,
        position_ids: trtp.TensorDesc,
        inv_freq: trtp.TensorDesc,
        interleaved: npt.NDArray[np.int32],
        rotary_dim: npt.NDArray[np.int32],
        outputs: Tuple[trtp.TensorDesc],
        tactic: int,
    ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
        if len(x.shape_expr) != 4:
            raise ValueError("llama_trt::RotaryEmbedding expects x of rank 4 [batch, heads, seq, head_dim]")
        head_dim = static_dim(x, 3, "RotaryEmbedding head_dim")
        try:
            n_heads_hint = static_dim(x, 1, "RotaryEmbedding heads")
        except ValueError:
            n_heads_hint = 32
        kernel, cfg = build_rope_ptx(
            trt_dtype_to_triton(x.dtype), head_dim, _scalar(rotary_dim), bool(_scalar(interleaved)), n_heads_hint
        )
        batch, heads, seq = x.shape_expr[0], x.shape_expr[1], x.shape_expr[2]
        launch = trtp.KernelLaunchParams()
        launch.grid_x = batch * seq
        launch.grid_y = trtp.cdiv(heads, cfg.BLOCK_H)
        return aot_launch(trtp, kernel, launch, (heads, seq))


def _define_jit(trtp, trt):
    @trtp.impl(PLUGIN_ID)
    def rope_impl(
        x: trtp.Tensor,
        position_ids: trtp.Tensor,
        inv_freq: trtp.Tensor,
        interleaved: npt.NDArray[np.int32],
        rotary_dim: npt.NDArray[np.int32],
        outputs: Tuple[trtp.Tensor],
        stream: int,
    ) -> None:
        import torch

        from .kernel import rope_triton

        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            x_t = torch.as_tensor(x, device="cuda")
            pos_t = torch.as_tensor(position_ids, device="cuda")
            inv_t = torch.as_tensor(inv_freq, device="cuda")
            out_t = torch.as_tensor(outputs[0], device="cuda")
            out_t.copy_(rope_triton(x_t, pos_t, inv_t, bool(_scalar(interleaved)), _scalar(rotary_dim)))


_REGISTRATION = PluginRegistration(PLUGIN_NAMESPACE, PLUGIN_NAME, _define, _define_aot, _define_jit)


def register_plugins(mode: str = "aot", target=None) -> str:
    """Register ``llama_trt::RotaryEmbedding`` with TensorRT's plugin registry. Idempotent.

    ``mode`` and ``target`` as in :func:`llama_trt.plugins.rms_norm.trt_plugin.register_plugins`
    ("aot" default; "jit"; "both" needs a PREFER_AOT/JIT network flag). Returns the plugin id.
    """
    return _REGISTRATION.register(mode, target)
