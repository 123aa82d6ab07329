"""Polygraphy runners: our torch model (the fp32 reference), ONNX Runtime, TensorRT.

* :class:`TorchRunner` is a Polygraphy ``BaseRunner`` over :class:`LlamaForCausalLM`
  built from the checkpoint in fp32. It speaks the ONNX IO contract (same input and
  output names), takes past keys/values in the artifact's dtype and computes in fp32.
  With ``capture`` it also returns intermediate tensors (RMSNorm inputs / outputs, see
  :mod:`.layerwise`) under the names the ONNX graph gives them.
* :func:`onnxrt_runner`: Polygraphy's ``OnnxrtRunner(SessionFromOnnx(...))`` on CPU.
* :func:`trt_runner`: Polygraphy's ``TrtRunner(EngineFromBytes(...))``. TensorRT is
  optional: :func:`require_tensorrt` checks, before Polygraphy ever tries its lazy
  import, that a TensorRT module (``tensorrt`` or TensorRT-RTX) is importable and that an
  NVIDIA GPU is present, and raises a one-line :class:`BackendUnavailableError` saying
  what to install otherwise.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
from polygraphy.backend.base import BaseRunner

from ..errors import BackendUnavailableError

TENSORRT_INSTALL_HINT = (
    "pip install 'llama-trt[rtx]' (TensorRT-RTX, RTX GPUs) or use JetPack's tensorrt; "
    "engines need an NVIDIA GPU to run"
)


def past_names(num_layers: int) -> list[str]:
    out = []
    for i in range(num_layers):
        out += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
    return out


def output_names(num_layers: int) -> list[str]:
    out = ["logits"]
    for i in range(num_layers):
        out += [f"present.{i}.key", f"present.{i}.value"]
    return out


class TorchRunner(BaseRunner):
    """Runs our torch LLaMA (fp32) behind the ONNX IO contract."""

    def __init__(self, checkpoint, past_dtype=np.float32, capture=None, name: str | None = None):
        """
        Args:
            checkpoint: a loaded :class:`~llama_trt.checkpoint.Checkpoint` or a path.
            past_dtype: numpy dtype of the past_key_values inputs (the artifact's dtype).
            capture: optional list of (tensor name, module call index, "in" | "out"): the
                k-th RMSNorm module call's input or output is returned under that name.
        """
        super().__init__(name=name or "torch-fp32-reference", prefix="torch-runner")
        self._checkpoint = checkpoint
        self.past_dtype = np.dtype(past_dtype)
        self.capture = list(capture or [])
        self.model = None
        self._hooks = []
        self._calls: list[tuple] = []

    # -- BaseRunner interface ---------------------------------------------------
    def activate_impl(self):
        from ..checkpoint import build_model, load_checkpoint

        ckpt = self._checkpoint
        if not hasattr(ckpt, "state_dict"):
            ckpt = load_checkpoint(ckpt)
        self.config = ckpt.config
        self.model = build_model(ckpt, "fp32")
        if self.capture:
            from ..model.llama import RMSNorm

            for module in self.model.modules():
                if isinstance(module, RMSNorm):
                    self._hooks.append(module.register_forward_hook(self._record))

    def _record(self, module, args, output):
        self._calls.append((args[0].detach(), output.detach()))

    def get_input_metadata_impl(self):
        from polygraphy.common import TensorMetadata

        meta = TensorMetadata()
        meta.add("input_ids", np.int64, ["batch", "seq"])
        meta.add("attention_mask", np.int64, ["batch", "total"])
        meta.add("position_ids", np.int64, ["batch", "seq"])
        for name in past_names(self.config.num_layers):
            meta.add(name, self.past_dtype, ["batch", self.config.num_kv_heads, "past", self.config.head_dim])
        return meta

    def infer_impl(self, feed_dict):
        import torch

        start = time.perf_counter()
        t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feed_dict.items()}
        past = [
            (t[f"past_key_values.{i}.key"].float(), t[f"past_key_values.{i}.value"].float())
            for i in range(self.config.num_layers)
        ]
        self._calls = []
        with torch.no_grad():
            logits, presents = self.model(t["input_ids"], t["attention_mask"], t["position_ids"], past)
        out = OrderedDict(logits=logits.numpy())
        for i, (k, v) in enumerate(presents):
            out[f"present.{i}.key"] = k.numpy()
            out[f"present.{i}.value"] = v.numpy()
        if self.capture:
            needed = 1 + max(index for _, index, _ in self.capture)
            if len(self._calls) < needed:
                raise RuntimeError(f"captured {len(self._calls)} RMSNorm calls; the layer mapping needs {needed}")
            for name, index, which in self.capture:
                x, y = self._calls[index]
                out[name] = (x if which == "in" else y).float().numpy()
        self.inference_time = time.perf_counter() - start
        return out

    def deactivate_impl(self):
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.model = None
        self._calls = []


def onnxrt_runner(onnx_path, name: str | None = None, session=None):
    """Polygraphy's ONNX Runtime runner on the CPU execution provider (``session``: an
    InferenceSession of ``onnx_path`` to reuse instead of building one at activation)."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    if session is None:
        session = SessionFromOnnx(str(onnx_path), providers=["CPUExecutionProvider"])
    return OnnxrtRunner(session, name=name or "onnxruntime")


def _nvidia_gpu_count() -> int:
    """Number of CUDA devices via the driver API (no torch, no CUDA toolkit needed)."""
    import ctypes

    for lib in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            cuda = ctypes.CDLL(lib)
        except OSError:
            continue
        if cuda.cuInit(0) != 0:
            return 0
        count = ctypes.c_int(0)
        if cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return count.value
    return 0


def require_tensorrt() -> str:
    """Make sure a TensorRT Python module and an NVIDIA GPU are there; return the module name.

    Checked explicitly because Polygraphy imports TensorRT lazily: without this the first
    use would fail deep inside Polygraphy with an ImportError traceback.
    Prefers full TensorRT (``tensorrt``); else TensorRT-RTX (``tensorrt_rtx``, or the
    ``tensorrt_rtx_bindings`` module of the PyPI wheels, aliased as ``tensorrt_rtx``), in
    which case Polygraphy is switched to its TensorRT-RTX mode.
    """
    module = None
    if importlib.util.find_spec("tensorrt") is not None:
        module = "tensorrt"
    else:
        for candidate in ("tensorrt_rtx", "tensorrt_rtx_bindings"):
            if importlib.util.find_spec(candidate) is not None:
                module = candidate
                break
    if module is None:
        raise BackendUnavailableError(f"TensorRT is not installed: {TENSORRT_INSTALL_HINT}")
    if _nvidia_gpu_count() == 0:
        raise BackendUnavailableError(
            f"no NVIDIA GPU found ({module} is installed, but TensorRT engines need an NVIDIA GPU "
            "to run); validate the ONNX export with --backend onnxruntime on this machine"
        )
    if module != "tensorrt":
        import polygraphy.config

        if "tensorrt_rtx" not in sys.modules:
            sys.modules["tensorrt_rtx"] = importlib.import_module(module)
        polygraphy.config.USE_TENSORRT_RTX = True
    return module


def tensorrt_version() -> str | None:
    for name in ("tensorrt", "tensorrt_rtx"):
        mod = sys.modules.get(name)
        if mod is not None:
            return f"{name} {getattr(mod, '__version__', '?')}"
    return None


def trt_runner(engine_path, name: str | None = None):
    """Polygraphy's TensorRT runner over a serialized engine (.plan)."""
    require_tensorrt()
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    data = Path(engine_path).read_bytes()
    return TrtRunner(EngineFromBytes(data), name=name or "tensorrt")
