"""What every fused op's ``trt_plugin.py`` shares: registration with ``tensorrt.plugin`` and
the Triton -> PTX compilation for TensorRT's AOT plugins.

Each op module keeps only its own ``register``/``autotune`` definitions, its AOT and JIT
implementations and its kernel signature, and registers them through one
:class:`PluginRegistration`.

Facts about ``tensorrt.plugin`` this relies on (read from the 10.x/11.x module source):

* ``register`` reads real annotation objects (``inspect.signature``), so the op modules must
  not use ``from __future__ import annotations`` (nor does this one). Attribute annotations
  decide the plugin field types: builtin ``float``/``int`` would declare FLOAT64/INT64
  fields, so attributes are declared ``npt.NDArray[np.float32]`` / ``npt.NDArray[np.int32]``
  to match what the ONNX parser sends (FLOAT -> FLOAT32, INT -> INT32, one element).
* The AOT plugin calls ``aot_impl(*inputs, *all_attrs, outputs, tactic)`` -- every attribute,
  in registration order -- and launches the PTX kernel with arguments
  ``(input pointers..., extra int32 scalars..., output pointers...)``; the kernels of this
  package use exactly that order. Only ``SymInt32`` extra arguments exist (no floats), so
  float attributes become ``tl.constexpr``.
* Triton >= 3.3 appends hidden ``global_scratch``/``profile_scratch`` pointer parameters to
  every kernel, which TensorRT does not pass. When the kernel does not use them (scratch
  sizes 0, no references in the PTX) they are removed from the PTX entry, so the PTX
  signature is exactly what TensorRT launches; otherwise compilation is refused.
* Plugin attributes are not serialized into an engine built with the AOT implementation.
"""

# NOTE: no ``from __future__ import annotations`` (see above).

import re
import threading
from typing import Callable, Dict, NamedTuple, Sequence, Set

MODES = ("aot", "jit", "both")
# Triton GPUTarget to compile the AOT kernels for; None = the current CUDA device.
# Shared by every op: the last ``register(..., target=...)`` sets it for all of them.
_AOT_TARGET = {"target": None}

__all__ = [
    "MODES",
    "CompiledKernel",
    "PluginRegistration",
    "aot_launch",
    "compile_triton_to_ptx",
    "import_trt_plugin",
    "static_dim",
    "strip_unused_trailing_params",
    "trt_dtype_to_triton",
]


# ----------------------------------------------------------------------------- registration


class PluginRegistration:
    """Registers one op with TensorRT's plugin registry, once per process (thread-safe).

    ``define(trtp, trt)`` declares ``register`` + ``autotune``; ``define_aot(trtp, trt)`` and
    ``define_jit(trtp, trt)`` add the AOT (PTX embedded in the engine) and JIT (Python at
    run time) implementations.
    """

    def __init__(
        self,
        namespace: str,
        name: str,
        define: Callable,
        define_aot: Callable,
        define_jit: Callable,
    ) -> None:
        self.namespace = namespace
        self.name = name
        self.plugin_id = f"{namespace}::{name}"
        self._define = define
        self._impl_definers = {"aot": define_aot, "jit": define_jit}
        self._lock = threading.Lock()
        self._defined = False
        self._impls: Set[str] = set()

    def register(self, mode: str = "aot", target=None) -> str:
        """Define the op and the implementations ``mode`` asks for; returns the plugin id.

        ``mode``: "aot", "jit" or "both"; a later call with another mode adds the missing
        implementation, none is removed. ``target``: optional Triton ``GPUTarget`` for the
        AOT PTX. Raises :class:`llama_trt.errors.BackendUnavailableError` when
        ``tensorrt.plugin`` (or, for "aot", TensorRT's AOT plugin support) is missing.
        """
        if mode not in MODES:
            raise ValueError(f"register_plugins: mode must be one of {MODES}, got {mode!r}")
        trtp, trt = import_trt_plugin(mode)
        with self._lock:
            if target is not None:
                _AOT_TARGET["target"] = target
            if not self._defined:
                if not self._already_defined(trtp):
                    self._define(trtp, trt)
                self._defined = True
            wanted = {"aot", "jit"} if mode == "both" else {mode}
            for impl in sorted(wanted - self._impls):
                self._impl_definers[impl](trtp, trt)
                self._impls.add(impl)
        return self.plugin_id

    def _already_defined(self, trtp) -> bool:
        # e.g. the op module was reloaded: tensorrt.plugin refuses a second `register`
        try:
            return hasattr(getattr(trtp.op, self.namespace), self.name)
        except AttributeError:
            return False


def import_trt_plugin(mode: str):
    """``(tensorrt.plugin, tensorrt)``, or :class:`BackendUnavailableError` saying what to install."""
    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp
    except Exception as e:  # noqa: BLE001 - ImportError or a missing libnvinfer
        from ..errors import BackendUnavailableError

        raise BackendUnavailableError(
            f"TensorRT Python plugins need full TensorRT with `tensorrt.plugin` (10.7+): {e}. "
            "Install TensorRT from NVIDIA's index or JetPack, or build without the plugin "
            "(lower the fused ops to their ONNX function bodies)."
        ) from e
    if mode in ("aot", "both") and not hasattr(trt, "QuickPluginCreationRequest"):
        from ..errors import BackendUnavailableError

        raise BackendUnavailableError(
            f"TensorRT {getattr(trt, '__version__', '?')} has no AOT Python plugins (need 10.9+); "
            "use register_plugins(mode='jit') or upgrade TensorRT."
        )
    return trtp, trt


# ----------------------------------------------------------------------------- Triton -> PTX


class CompiledKernel(NamedTuple):
    name: str          # PTX entry name
    ptx: str
    block_x: int       # threads per block = num_warps * warp size
    shared_mem: int    # dynamic shared memory in bytes


def aot_launch(trtp, kernel: CompiledKernel, launch, scalars: Sequence):
    """What an ``aot_impl`` returns: PTX entry name, PTX, ``launch`` (its grid already set by the
    op; block size and shared memory from ``kernel``) and the int32 ``scalars`` TensorRT passes
    between the input and output pointers."""
    launch.block_x = kernel.block_x
    launch.shared_mem = kernel.shared_mem
    extra_args = trtp.SymIntExprs.from_tuple([trtp.SymInt32(s) for s in scalars])
    return kernel.name.encode(), kernel.ptx.encode(), launch, extra_args


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
    (``None``: the one given to :meth:`PluginRegistration.register`, else the current CUDA device).
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
