"""ONNX Runtime session: IO binding over a preallocated, double-buffered KV cache.

The graph concatenates past + new keys/values into ``present.*``. Each layer's K and V
get two flat buffers of batch * n_kv_heads * capacity * head_dim elements, allocated once
per :meth:`reset`. A step binds ``past_key_values.*`` to the first past*... elements of
buffer A (a contiguous [batch, kv, past, hd] view) and ``present.*`` to buffer B, then the
two swap. The cache never goes through numpy and nothing is allocated per token; only
input ids / mask / positions (a few int64) go in and the logits come out.

``kv_mode="ort"`` instead lets ONNX Runtime allocate the presents and rebinds those
OrtValues as the next step's past (no preallocation, still no numpy copies).

``fused_ops=True`` (the default on CPU) loads the export through
:func:`.ort_lowering.lower_for_ort` first: RoPE / RMSNorm (+ residual Add) / attention become
opset-23 ``RotaryEmbedding`` / ``com.microsoft.SkipSimplifiedLayerNormalization`` / opset-23
``Attention`` kernels and q/k/v, gate/up MatMuls are packed, instead of ~1000 small ops. Same
inputs and outputs; the rewritten model lives in memory only (nothing is written next to the
export); ``describe()["fused_ops_rewrite"]`` says what was rewritten (or why not).

``allow_spinning=False`` makes ORT's intra-op workers sleep instead of spin-waiting: slower on
an idle machine, much faster on a busy, shared one (benchmarks/RESULTS.md, "Runtime (CPU)").

No torch import here: edge boxes run exports without torch.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ...config import LlamaConfig
from ...errors import BackendUnavailableError
from ..artifact import Artifact, ArtifactError
from .base import Session, physical_cores

#: external initializers up to this many elements are read into the in-memory model before the
#: fused-ops rewrite (inv_freq, norm weights, ...); bigger ones stay in the export's data file
_INLINE_EXTERNAL_MAX = 1 << 16

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(bfloat16)": None}


def gpu_visible() -> bool:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return Path("/dev/nvidiactl").exists() or shutil.which("nvidia-smi") is not None


def default_providers(ort) -> list[str]:
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available and gpu_visible():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OrtSession(Session):
    backend = "onnxruntime"

    @classmethod
    def from_artifact(cls, artifact: Artifact, **options) -> "OrtSession":
        return cls(artifact.onnx_path, artifact.config, artifact.max_context or artifact.config.max_position_embeddings,
                   **options)

    def __init__(self, onnx_path, config: LlamaConfig, max_context: int, *, threads: int | None = None,
                 providers: list[str] | None = None, kv_mode: str = "prealloc", fused_ops: bool | None = None,
                 allow_spinning: bool = True, **_ignored) -> None:
        super().__init__(config, max_context)
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendUnavailableError("onnxruntime is not installed; pip install onnxruntime") from None
        self._ort = ort
        if kv_mode not in ("prealloc", "ort"):
            raise ValueError(f"kv_mode must be 'prealloc' or 'ort', got {kv_mode!r}")
        self.kv_mode = kv_mode
        self.onnx_path = Path(onnx_path)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.intra_op_num_threads = int(threads or physical_cores())
        so.inter_op_num_threads = 1
        so.enable_mem_pattern = True
        so.enable_cpu_mem_arena = True
        so.log_severity_level = 3
        # spinning workers wait faster on a quiet machine and waste shared cores on a busy one
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
        self.allow_spinning = bool(allow_spinning)
        # ORT CPU fuses DequantizeLinear(int8 / int4 blocked) -> MatMul into MatMulNBits, whose
        # default accuracy level quantizes the activations to int8 on the fly (SmolLM2 int8-weight:
        # KL 0.0035 -> 0.0085). Level 1 computes in fp32, the graph's own semantics.
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
        self._so = so
        providers = list(providers) if providers else default_providers(ort)
        # the fused kernels are verified on CPU only: default on there, opt-in elsewhere
        if fused_ops is None:
            fused_ops = providers == ["CPUExecutionProvider"]
        self.fused_ops = False
        self.fused_ops_report: dict[str, Any] | str = "off (fused_ops=False)"
        model_src: str | bytes = str(self.onnx_path)
        if fused_ops:
            model_src = self._lowered_bytes(so, max_context) or model_src
        try:
            self.sess = ort.InferenceSession(model_src, so, providers=providers)
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
            if providers != ["CPUExecutionProvider"] and "CPUExecutionProvider" in providers:
                self.sess = ort.InferenceSession(model_src, so, providers=["CPUExecutionProvider"])
            else:
                raise ArtifactError(f"ONNX Runtime cannot load {self.onnx_path}: {str(e).splitlines()[0]}") from None
        self.providers = self.sess.get_providers()
        self.device = "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"
        self._check_io()

    def _lowered_bytes(self, so, max_context: int) -> bytes | None:
        """The export rewritten for ORT's fused CPU kernels, serialized; None (plain graph) when
        the rewrite does not apply, with the reason kept for :meth:`describe`."""
        try:
            import onnx
            from onnx import external_data_helper as ext

            from .ort_lowering import can_lower, lower_for_ort
        except ImportError as e:
            self.fused_ops_report = f"off: {e} (the rewrite needs the onnx package)"
            return None
        model = onnx.load(str(self.onnx_path), load_external_data=False)
        why = can_lower(model)
        if why is not None:
            self.fused_ops_report = f"off: {why}"
            return None
        base = str(self.onnx_path.parent)
        external = False
        for t in model.graph.initializer:
            if ext.uses_external_data(t):
                external = True
                if int(np.prod(t.dims)) <= _INLINE_EXTERNAL_MAX:  # small constants the rewrite reads
                    ext.load_external_data_for_tensor(t, base)
                    t.data_location = onnx.TensorProto.DEFAULT
                    del t.external_data[:]
        try:
            lowered, report = lower_for_ort(model, max(int(max_context), self.config.max_position_embeddings))
        except Exception as e:  # noqa: BLE001 - an unexpected graph: run it as exported
            self.fused_ops_report = f"off: rewrite failed ({type(e).__name__}: {str(e).splitlines()[0]})"
            return None
        try:
            data = lowered.SerializeToString()
        except Exception as e:  # noqa: BLE001 - e.g. over protobuf's 2 GB
            self.fused_ops_report = f"off: rewritten model not serializable ({type(e).__name__})"
            return None
        if external:  # big weights stay in the export folder's data file(s)
            so.add_session_config_entry("session.model_external_initializers_file_folder_path", base)
        self.fused_ops = True
        self.fused_ops_report = report.to_dict()
        return data

    def _check_io(self) -> None:
        c = self.config
        inputs = {i.name: i for i in self.sess.get_inputs()}
        outputs = {o.name for o in self.sess.get_outputs()}
        need_in = ["input_ids", "attention_mask", "position_ids"] + [
            f"past_key_values.{i}.{kv}" for i in range(c.num_layers) for kv in ("key", "value")]
        need_out = ["logits"] + [f"present.{i}.{kv}" for i in range(c.num_layers) for kv in ("key", "value")]
        missing = [n for n in need_in if n not in inputs] + [n for n in need_out if n not in outputs]
        if missing:
            raise ArtifactError(
                f"{self.onnx_path} does not follow the IO contract (missing {', '.join(missing[:4])}"
                f"{'...' if len(missing) > 4 else ''}); re-export it with `llama-trt export`"
            )
        kv_type = inputs["past_key_values.0.key"].type
        dtype = _ORT_TYPES.get(kv_type)
        if dtype is None:
            raise ArtifactError(f"{self.onnx_path}: KV cache type {kv_type} is not supported (fp32 or fp16)")
        self.kv_dtype = np.dtype(dtype)
        self._names = [(f"past_key_values.{i}.key", f"past_key_values.{i}.value",
                        f"present.{i}.key", f"present.{i}.value") for i in range(c.num_layers)]

    # ---- cache ----------------------------------------------------------------------
    def _alloc(self, n: int):
        if self.device == "cpu":
            return np.empty(max(n, 1), dtype=self.kv_dtype)
        return self._ort.OrtValue.ortvalue_from_shape_and_type([max(n, 1)], self.kv_dtype, "cuda", 0)

    @staticmethod
    def _ptr(buf) -> int:
        return buf.ctypes.data if isinstance(buf, np.ndarray) else buf.data_ptr()

    def _reset(self, batch: int, capacity: int) -> None:
        c = self.config
        self._io = self.sess.io_binding()
        self._cur = 0
        self._presents = None
        self._bufs = None
        if self.kv_mode == "prealloc":
            n = batch * c.num_kv_heads * capacity * c.head_dim
            # two buffers (A, B) per layer for key and value: [layer][k|v][A|B]
            self._bufs = [[(self._alloc(n), self._alloc(n)) for _ in range(2)] for _ in range(c.num_layers)]
            # raw pointers, looked up once: [layer][k|v][A|B]
            self._ptrs = [[(self._ptr(a), self._ptr(b)) for a, b in layer] for layer in self._bufs]

    def _forward(self, input_ids, attention_mask, position_ids) -> np.ndarray:
        c = self.config
        b, seq = input_ids.shape
        past = self.past_len
        io = self._io
        io.clear_binding_inputs()
        io.clear_binding_outputs()
        io.bind_cpu_input("input_ids", input_ids)
        io.bind_cpu_input("attention_mask", attention_mask)
        io.bind_cpu_input("position_ids", position_ids)
        past_shape = [b, c.num_kv_heads, past, c.head_dim]
        present_shape = [b, c.num_kv_heads, past + seq, c.head_dim]
        dev = self.device
        if self.kv_mode == "prealloc":
            src, dst = self._cur, 1 - self._cur
            dt = self.kv_dtype
            for (pk, pv, ok, ov), ptrs in zip(self._names, self._ptrs):
                io.bind_input(pk, dev, 0, dt, past_shape, ptrs[0][src])
                io.bind_output(ok, dev, 0, dt, present_shape, ptrs[0][dst])
                io.bind_input(pv, dev, 0, dt, past_shape, ptrs[1][src])
                io.bind_output(ov, dev, 0, dt, present_shape, ptrs[1][dst])
        else:
            for li, (pk, pv, ok, ov) in enumerate(self._names):
                if self._presents is None:
                    empty = np.zeros(past_shape, dtype=self.kv_dtype)
                    io.bind_cpu_input(pk, empty)
                    io.bind_cpu_input(pv, empty)
                else:
                    io.bind_ortvalue_input(pk, self._presents[2 * li])
                    io.bind_ortvalue_input(pv, self._presents[2 * li + 1])
                io.bind_output(ok, dev)
                io.bind_output(ov, dev)
        logits = np.empty((b, seq, c.vocab_size), dtype=np.float32)
        io.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        self.sess.run_with_iobinding(io)
        if self.kv_mode == "prealloc":
            self._cur = 1 - self._cur
        else:
            # outputs come back in binding order: present k/v per layer, then logits
            self._presents = list(io.get_outputs())[: 2 * c.num_layers]
        return logits

    def kv_cache(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """A numpy copy of the current cache (for tests/debugging): [(key, value)] per layer."""
        c = self.config
        shape = (self.batch, c.num_kv_heads, self.past_len, c.head_dim)
        n = int(np.prod(shape))
        out = []
        for li in range(c.num_layers):
            if self.kv_mode == "prealloc":
                pair = [self._bufs[li][k][self._cur] for k in range(2)]
                arrs = [p[:n].reshape(shape) if isinstance(p, np.ndarray) else p.numpy()[:n].reshape(shape)
                        for p in pair]
            else:
                arrs = [self._presents[2 * li].numpy(), self._presents[2 * li + 1].numpy()]
            out.append((arrs[0].copy(), arrs[1].copy()))
        return out

    def describe(self) -> dict[str, Any]:
        so = self._so
        return {
            **super().describe(),
            "onnx": str(self.onnx_path),
            "onnxruntime": self._ort.__version__,
            "providers": self.providers,
            "device": self.device,
            "kv_dtype": str(self.kv_dtype),
            "intra_op_num_threads": so.intra_op_num_threads,
            "inter_op_num_threads": so.inter_op_num_threads,
            "graph_optimization_level": "ORT_ENABLE_ALL",
            "execution_mode": "ORT_SEQUENTIAL",
            "enable_mem_pattern": so.enable_mem_pattern,
            "enable_cpu_mem_arena": so.enable_cpu_mem_arena,
            "intra_op_allow_spinning": self.allow_spinning,
            "fused_ops": self.fused_ops,
            "fused_ops_rewrite": self.fused_ops_report,
            "kv_cache": ("preallocated double buffer per layer, bound with IO binding (no numpy copies, "
                         "no per-token allocation)" if self.kv_mode == "prealloc"
                         else "ORT-allocated presents rebound as next past (IO binding, no numpy copies)"),
        }

    def close(self) -> None:
        self._bufs = None
        self._presents = None
        self.sess = None

