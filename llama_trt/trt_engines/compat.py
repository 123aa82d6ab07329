"""Can this machine run an engine? Checked from the manifest BEFORE deserializing.

* backend flavour and version must match the installed one (engines are tied to the
  TensorRT / TensorRT-RTX release that built them);
* the GPU's compute capability must be one of the engine's targets; TensorRT-RTX does not
  support sm_90 (Hopper, e.g. H100) at all.

The GPU is queried without torch: the CUDA driver API through ctypes, else ``nvidia-smi``.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from dataclasses import dataclass

from ..errors import BackendUnavailableError
from .backend import TENSORRT_RTX, Backend

RTX_UNSUPPORTED = {"90": "Hopper, e.g. H100/H200"}


class EngineIncompatibleError(BackendUnavailableError):
    """The engine cannot run on this machine (backend, version or GPU mismatch)."""


def sm(cc: str) -> str:
    return f"sm_{cc}"


def _flavour(name: str) -> str:
    return "TensorRT-RTX" if name == TENSORRT_RTX else "TensorRT"


def _release(version: str, parts: int = 3) -> tuple[str, ...]:
    return tuple(str(version).split(".")[:parts])


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    compute_capability: str   # "89"


def gpu_compute_capability(index: int = 0) -> GpuInfo | None:
    """The compute capability of GPU ``index`` (None when there is no usable NVIDIA GPU)."""
    return _cc_from_driver(index) or _cc_from_nvidia_smi(index)


def _cc_from_driver(index: int) -> GpuInfo | None:
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    try:
        if cuda.cuInit(0) != 0:
            return None
        dev = ctypes.c_int()
        if cuda.cuDeviceGet(ctypes.byref(dev), int(index)) != 0:
            return None
        major, minor = ctypes.c_int(), ctypes.c_int()
        # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75, _MINOR = 76
        if cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, dev) != 0:
            return None
        if cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev) != 0:
            return None
        name = ctypes.create_string_buffer(256)
        cuda.cuDeviceGetName(name, 256, dev)
        return GpuInfo(int(index), name.value.decode(errors="replace"), f"{major.value}{minor.value}")
    except (AttributeError, OSError):
        return None


def _cc_from_nvidia_smi(index: int) -> GpuInfo | None:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=name,compute_cap", "--format=csv,noheader", "-i", str(index)],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0 or "," not in out.stdout:
        return None
    name, _, cc = out.stdout.strip().splitlines()[0].rpartition(",")
    cc = cc.strip().replace(".", "")
    return GpuInfo(int(index), name.strip(), cc) if cc.isdigit() else None


def compatibility_problems(engine_backend: str, engine_version: str, targets, installed: Backend | None,
                           gpu_cc: str | None) -> list[str]:
    """Every reason the engine cannot run here ([] = compatible). Pure: feed it anything."""
    want = f"{_flavour(engine_backend)} {engine_version}"
    problems: list[str] = []
    targets = [str(t) for t in targets or ()]
    if installed is None:
        pkg = ("tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings" if engine_backend == TENSORRT_RTX
               else "TensorRT (JetPack or NVIDIA's index)")
        problems.append(f"this engine was built with {want}, which is not installed; install {pkg} "
                        f"version {'.'.join(_release(engine_version))}")
    elif installed.name != engine_backend:
        problems.append(f"this engine was built with {want} but {installed.display_name} is installed; engines "
                        "do not move between TensorRT and TensorRT-RTX: rebuild it with `llama-trt build`")
    elif _release(installed.version) != _release(engine_version):
        problems.append(f"this engine was built with {want} but {installed.display_name} is installed; an engine "
                        "only runs on the release that built it: rebuild it with `llama-trt build` or install "
                        f"{_flavour(engine_backend)} {'.'.join(_release(engine_version))}")
    if gpu_cc is None:
        problems.append("no NVIDIA GPU found (CUDA driver not available); TensorRT engines need a GPU: run the ONNX "
                        "export with --backend onnxruntime instead")
        return problems
    gpu_cc = str(gpu_cc)
    if engine_backend == TENSORRT_RTX and gpu_cc in RTX_UNSUPPORTED:
        problems.append(f"TensorRT-RTX does not support {sm(gpu_cc)} ({RTX_UNSUPPORTED[gpu_cc]}): this GPU cannot "
                        "run TensorRT-RTX engines; use full TensorRT (build the engine on this machine with "
                        "`tensorrt` installed and LLAMA_TRT_BACKEND=tensorrt) or ONNX Runtime")
    elif targets and gpu_cc not in targets:
        built_for = ", ".join(sm(t) for t in targets)
        fix = (f"rebuild with --target {gpu_cc}" if engine_backend == TENSORRT_RTX
               else "full TensorRT engines are GPU-specific: rebuild the engine on this GPU")
        problems.append(f"this engine targets {built_for} but this GPU is {sm(gpu_cc)}; {fix}")
    return problems


def check_engine_compatibility(manifest, installed: Backend | None, gpu_cc: str | None) -> None:
    """Raise :class:`EngineIncompatibleError` with every problem (manifest: an EngineManifest)."""
    problems = compatibility_problems(manifest.backend, manifest.backend_version, manifest.targets, installed, gpu_cc)
    if problems:
        raise EngineIncompatibleError("; ".join(problems))


__all__ = [
    "EngineIncompatibleError", "GpuInfo", "check_engine_compatibility", "compatibility_problems",
    "gpu_compute_capability",
]
