"""TensorRT / TensorRT-RTX engine session: the KV cache stays on the GPU between steps.

* Compatibility is checked from ``manifest.json`` BEFORE deserializing: installed backend
  flavour and release vs the engine's, and the GPU's compute capability vs the engine's
  targets (TensorRT-RTX does not support sm_90). See :mod:`llama_trt.trt_engines.compat`.
* Device memory comes from ``polygraphy.cuda`` (ctypes over libcudart): no torch import.
* Per layer, K and V each have two device buffers of ``batch * n_kv_heads * capacity *
  head_dim`` elements used ping-pong: step t reads ``past`` from one and writes ``present``
  into the other; step t+1 binds that present as its past. No host round trip.
* Each step selects the optimization profile by phase (:func:`select_profile`: profile 0
  prefill for past = 0, profile 1 decode for seq = 1), sets the input shapes, binds device
  addresses with ``set_tensor_address`` and runs ``execute_async_v3`` on one stream; only
  the logits come back to the host.

Written against the documented TensorRT Python API; it needs an NVIDIA GPU to run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ...errors import GenerationError
from ..artifact import Artifact
from .base import Session

_INPUTS = ("input_ids", "attention_mask", "position_ids")
_NP_BY_TRT = {"FLOAT": np.float32, "HALF": np.float16, "INT64": np.int64, "INT32": np.int32, "BF16": None,
              "INT8": np.int8, "BOOL": np.bool_}


def _np_dtype(trt_dtype) -> np.dtype:
    dt = _NP_BY_TRT.get(trt_dtype.name)
    if dt is None:
        raise GenerationError(f"engine tensor type {trt_dtype.name} is not supported by this session")
    return np.dtype(dt)


class TensorRTSession(Session):
    """Runs an engine folder made by ``llama-trt build``."""

    backend = "tensorrt"

    @classmethod
    def from_artifact(cls, artifact: Artifact, **options) -> "TensorRTSession":
        return cls(artifact.path, **options)

    def __init__(self, engine_dir, *, device: int = 0, verbose: bool = False, **_ignored: Any) -> None:
        from ...trt_engines import backend as B
        from ...trt_engines.compat import EngineIncompatibleError, check_engine_compatibility, gpu_compute_capability
        from ...trt_engines.manifest import load_engine_manifest

        self.engine_dir = Path(engine_dir)
        self.manifest = load_engine_manifest(self.engine_dir)
        super().__init__(self.manifest.llama_config, self.manifest.max_context)
        m = self.manifest
        try:
            installed = B.detect_backend(m.backend)
        except Exception:  # noqa: BLE001 - reported by the compatibility check
            installed = None
        self.gpu = gpu_compute_capability(device)
        check_engine_compatibility(m, installed, self.gpu.compute_capability if self.gpu else None)

        from polygraphy import cuda  # ctypes over libcudart; no torch

        self._cuda = cuda
        trt = installed.module()
        self._installed = installed
        self._logger = B.make_logger(installed, "WARNING" if verbose else "ERROR")
        self._runtime = trt.Runtime(self._logger)
        data = (self.engine_dir / m.engine_file).read_bytes()
        self._engine = self._runtime.deserialize_cuda_engine(data)
        del data
        if self._engine is None:
            errors = "; ".join(self._logger.errors()[-3:]) or "no message from TensorRT"
            raise EngineIncompatibleError(
                f"{installed.display_name} could not deserialize {self.engine_dir / m.engine_file}: {errors}; "
                "rebuild the engine on this machine with `llama-trt build`"
            )
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise EngineIncompatibleError("could not create an execution context (out of GPU memory?)")
        self._stream = cuda.Stream()
        self._trt = trt
        self._io_dtypes = {}
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        for name in names:
            self._io_dtypes[name] = _np_dtype(self._engine.get_tensor_dtype(name))
        n = self.config.num_layers
        self._past = [f"past_key_values.{i}.{kv}" for i in range(n) for kv in ("key", "value")]
        self._present = [f"present.{i}.{kv}" for i in range(n) for kv in ("key", "value")]
        missing = [x for x in (*_INPUTS, *self._past, "logits", *self._present) if x not in self._io_dtypes]
        if missing:
            raise EngineIncompatibleError(f"engine IO lacks {', '.join(missing)}: not a llama-trt engine; rebuild it")
        self._profiles = m.profiles
        self._active_profile: int | None = None
        self._inputs: dict[str, Any] = {}
        self._kv: dict[str, list[Any]] = {}
        self._logits = None
        self._cur = 0

    # ---- buffers -----------------------------------------------------------------
    def _device_array(self, shape, dtype):
        from polygraphy.datatype import DataType

        return self._cuda.DeviceArray(shape=tuple(shape), dtype=DataType.from_dtype(np.dtype(dtype)))

    def _reset(self, batch: int, capacity: int) -> None:
        limits = self.manifest.shape_limits
        if batch > limits.max_batch:
            raise GenerationError(f"batch {batch} exceeds the engine's --max-batch {limits.max_batch}; rebuild it")
        cfg = self.config
        kv_dtype = self._io_dtypes[self._past[0]]
        kv_bytes = batch * cfg.num_kv_heads * capacity * cfg.head_dim * kv_dtype.itemsize
        for name in self._past:
            bufs = self._kv.get(name)
            if bufs is None:
                self._kv[name] = [self._device_array((max(kv_bytes, 1),), np.uint8) for _ in range(2)]
            else:
                for buf in bufs:
                    buf.resize((max(kv_bytes, 1),))  # reallocates only when it grows
        seq_cap = max(limits.max_seq, 1)
        shapes = {"input_ids": (batch, seq_cap), "attention_mask": (batch, capacity), "position_ids": (batch, seq_cap)}
        for name, shape in shapes.items():
            if name not in self._inputs:
                self._inputs[name] = self._device_array(shape, self._io_dtypes[name])
            else:
                self._inputs[name].resize(shape)
        logits_shape = (batch, seq_cap, cfg.vocab_size)
        if self._logits is None:
            self._logits = self._device_array(logits_shape, self._io_dtypes["logits"])
        else:
            self._logits.resize(logits_shape)
        self._cur = 0

    # ---- forward -------------------------------------------------------------------
    def _forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, *,
                 last_only: bool = False) -> np.ndarray:
        from ...trt_engines.profiles import select_profile

        ctx, stream = self._context, self._stream
        b, s = input_ids.shape
        past = self.past_len
        profile = select_profile(self._profiles, b, s, past)
        if profile != self._active_profile:
            if not ctx.set_optimization_profile_async(profile, stream.ptr):
                raise GenerationError(f"TensorRT refused optimization profile {profile}")
            self._active_profile = profile
        host = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        for name, arr in host.items():
            arr = np.ascontiguousarray(arr, dtype=self._io_dtypes[name])
            host[name] = arr  # keep alive until the stream is synchronized
            buf = self._inputs[name].resize(arr.shape)
            buf.copy_from(arr, stream)
            ctx.set_input_shape(name, arr.shape)
            ctx.set_tensor_address(name, buf.ptr)
        cfg = self.config
        past_shape = (b, cfg.num_kv_heads, past, cfg.head_dim)
        for past_name, present_name in zip(self._past, self._present):
            src, dst = self._kv[past_name][self._cur], self._kv[past_name][1 - self._cur]
            ctx.set_input_shape(past_name, past_shape)
            ctx.set_tensor_address(past_name, src.ptr)
            ctx.set_tensor_address(present_name, dst.ptr)
        logits = self._logits.resize((b, s, cfg.vocab_size))
        ctx.set_tensor_address("logits", logits.ptr)
        out_shape = tuple(ctx.get_tensor_shape("logits"))
        if out_shape != (b, s, cfg.vocab_size):
            raise GenerationError(f"engine reports logits shape {out_shape}, expected {(b, s, cfg.vocab_size)}")
        if not ctx.execute_async_v3(stream.ptr):
            errors = "; ".join(self._logger.errors()[-3:]) or "no message from TensorRT"
            raise GenerationError(f"TensorRT execution failed: {errors}")
        out = np.empty((b, s, cfg.vocab_size), dtype=self._io_dtypes["logits"])
        logits.copy_to(out, stream)
        stream.synchronize()
        self._cur = 1 - self._cur  # this step's present is the next step's past
        return (out[:, -1:] if last_only else out).astype(np.float32, copy=False)

    def kv_cache(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Host copies of the cache, per layer (key, value) [batch, n_kv_heads, past, head_dim] (debugging)."""
        cfg = self.config
        shape = (self.batch, cfg.num_kv_heads, self.past_len, cfg.head_dim)
        dtype = self._io_dtypes[self._past[0]]
        arrays = []
        for name in self._past:
            host = np.empty(shape, dtype=dtype)
            if host.size:
                raw = self._kv[name][self._cur]
                view = self._cuda.DeviceView(raw.ptr, shape, _polygraphy_dtype(dtype))
                view.copy_to(host, self._stream)
            arrays.append(host)
        self._stream.synchronize()
        return [(arrays[i], arrays[i + 1]) for i in range(0, len(arrays), 2)]

    def describe(self) -> dict[str, Any]:
        m = self.manifest
        return super().describe() | {
            "engine": str(self.engine_dir / m.engine_file), "trt_backend": m.backend,
            "trt_version": self._installed.version, "precision": m.precision, "targets": list(m.targets),
            "gpu": {"name": self.gpu.name, "compute_capability": self.gpu.compute_capability} if self.gpu else None,
            "profiles": [p.to_dict() for p in m.profiles], "kv_cache": "device (ping-pong buffers)",
        }

    def close(self) -> None:
        for bufs in self._kv.values():
            for buf in bufs:
                buf.free()
        for buf in self._inputs.values():
            buf.free()
        if self._logits is not None:
            self._logits.free()
        self._kv, self._inputs, self._logits = {}, {}, None
        self._context = self._engine = None
        if getattr(self, "_stream", None) is not None:
            self._stream.free()
            self._stream = None


def _polygraphy_dtype(dtype):
    from polygraphy.datatype import DataType

    return DataType.from_dtype(np.dtype(dtype))


__all__ = ["TensorRTSession"]
