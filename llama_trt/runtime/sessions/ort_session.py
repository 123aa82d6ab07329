"""ONNX Runtime session: IO binding over a preallocated, double-buffered KV cache.

The graph concatenates past + new keys/values into ``present.*``. Each layer's K and V
get two flat buffers of batch * n_kv_heads * capacity * head_dim elements, allocated once
per :meth:`reset`. A step binds ``past_key_values.*`` to the first past*... elements of
buffer A (a contiguous [batch, kv, past, hd] view) and ``present.*`` to buffer B, then the
two swap. The cache never goes through numpy and nothing is allocated per token; only
input ids / mask / positions (a few int64) go in and the logits come out.

``kv_mode="ort"`` instead lets ONNX Runtime allocate the presents and rebinds those
OrtValues as the next step's past (no preallocation, still no numpy copies).

``fused_ops=True`` (the default on CPU) runs the export through
:func:`.ort_lowering.lower_for_ort`: RoPE / RMSNorm (+ residual Add) / attention become
opset-23 ``RotaryEmbedding`` / ``com.microsoft.SkipSimplifiedLayerNormalization`` / opset-23
``Attention`` kernels instead of ~1000 small ops. Same inputs and outputs;
``describe()["fused_ops_rewrite"]`` says what was rewritten (or why not). The graph ONNX
Runtime loads is made once per export and cached (:mod:`.ort_cache`, ``cache_dir``); its
weights stay in the export's file and are read from there, so they exist once in memory.

``max_context`` (``from_artifact`` option) caps the context below the export's: the KV cache
:meth:`reset` allocates by default is sized to it.

An int8-sq export (int8 activations through Q/DQ, made for TensorRT) runs slowly on ONNX
Runtime's CPU kernels: the session says so at open (``warning:`` on stderr, ``warn=False``
to keep quiet; ``target_warning`` holds the text).

``trim_memory`` (default on): glibc returns the memory ORT frees while it opens the session
(:mod:`.malloc_trim`; SmolLM2 int8 peak RSS 398 -> 318 MiB).

The quantized weights' kernel form (:class:`~llama_trt.quantize.schemes.OrtKernelForm`) is the
one the export's certificate chose (``quantization.ort_kernel`` in its manifest; defaults for
exports without one). ``int8_block`` overrides the block ONNX Runtime's int8 kernel rounds
activations in for per-channel int8 weights (:func:`.ort_pack.int8_kernel_blocks`);
``head_scan_bits`` / ``head_scan_block`` the weights an int8 lm head's candidates are found with
(:func:`.ort_head.int4_head_scan`).

``allow_spinning=False`` makes ORT's intra-op workers sleep instead of spin-waiting: slower on
an idle machine, much faster on a busy, shared one (benchmarks/RESULTS.md, "Runtime (CPU)").

No torch import here: edge boxes run exports without torch.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ...config import LlamaConfig
from ...errors import BackendUnavailableError
from ...quantize.schemes import OrtKernelForm
from ..artifact import Artifact, ArtifactError
from .base import Session, physical_cores
from .malloc_trim import returning_freed_memory
from .ort_cache import SessionGraph, session_graph
from .ort_gqa import ATTENTION_BIAS, SEQLENS_K, SHARED, TOTAL_LENGTH
from .ort_lowering import LOGITS_INDEX
from .ort_shared_kv import SharedKV, bind_logits_index

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(bfloat16)": None}


def gpu_visible() -> bool:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return Path("/dev/nvidiactl").exists() or shutil.which("nvidia-smi") is not None


def _manifest(onnx_path: Path) -> dict[str, Any]:
    try:
        data = json.loads((Path(onnx_path).parent / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def cpu_note(onnx_path: Path, device: str) -> str | None:
    """What an fp16 export costs on ONNX Runtime's CPU kernels (kept in ``describe()``)."""
    if device == "cpu" and _manifest(onnx_path).get("dtype") == "fp16":
        return ("fp16 export on CPU: ONNX Runtime's CPU MatMul kernels take fp32, so it converts the fp16 "
                "weights to fp32 at open: memory and speed of the fp32 export")
    return None


def kernel_form(onnx_path: Path, **overrides) -> OrtKernelForm:
    """The kernel form the export was certified with (``quantization.ort_kernel`` in its
    manifest, chosen by ``quantize/kernel_form.py``; defaults where it records none), with the
    ``overrides`` that are not None. A value the session cannot run raises ArtifactError."""
    quant = _manifest(onnx_path).get("quantization")
    try:
        form = OrtKernelForm.from_record(quant.get("ort_kernel") if isinstance(quant, dict) else None)
        return replace(form, **{k: int(v) for k, v in overrides.items() if v is not None})
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"{e} (the ONNX Runtime kernel forms this session can run); re-export with "
                            "`llama-trt export --quantize ...`") from None


def target_warning(onnx_path: Path, device: str) -> str | None:
    """Why this export is a poor fit for ONNX Runtime on ``device``, or None."""
    manifest = _manifest(onnx_path)
    quant = manifest.get("quantization")
    scheme = quant.get("scheme") if isinstance(quant, dict) else None
    if scheme == "int8-sq" and device == "cpu":
        return ("this int8-sq export (int8 activations through QuantizeLinear/DequantizeLinear) targets TensorRT; "
                "ONNX Runtime on CPU runs it several times slower than fp32. For CPU use an int8-weight "
                "(`llama-trt export --quantize int8-weight`) or fp32 export.")
    return None


def default_providers(ort) -> list[str]:
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available and gpu_visible():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OrtSession(Session):
    backend = "onnxruntime"

    @classmethod
    def from_artifact(cls, artifact: Artifact, max_context: int | None = None, **options) -> "OrtSession":
        """``max_context``: a context below the export's (smaller default KV cache)."""
        limit = artifact.max_context or artifact.config.max_position_embeddings
        if max_context is not None and not 1 <= int(max_context) <= limit:
            raise ArtifactError(f"max_context {max_context} is outside 1..{limit} (the export's context)")
        return cls(artifact.onnx_path, artifact.config, int(max_context or limit), **options)

    def __init__(self, onnx_path, config: LlamaConfig, max_context: int, *, threads: int | None = None,
                 providers: list[str] | None = None, kv_mode: str = "prealloc", fused_ops: bool | None = None,
                 allow_spinning: bool = True, cache_dir: Path | None = None, cache: bool = True,
                 warn: bool = True, nbits_accuracy_level: int = 4, trim_memory: bool = True,
                 int8_block: int | None = None, head_scan_bits: int | None = None,
                 head_scan_block: int | None = None, **_ignored) -> None:
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
        # ORT CPU fuses DequantizeLinear(int8 / int4 blocked) -> MatMul into MatMulNBits. Level 4
        # (ORT's and onnxruntime-genai's default) quantizes the activations to int8 on the fly: fast
        # (SmolLM2 int4 89 tok/s, int8-weight 62 on 2 threads) at some accuracy (int8-weight KL
        # 0.0029 -> ~0.008). Level 1 computes in fp32, the graph's own semantics, but ORT 1.32's
        # x86 kernels then dequantize per call: 6-8 tok/s, slower than fp32. So 4 by default.
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(int(nbits_accuracy_level)))
        self._so = so
        providers = list(providers) if providers else default_providers(ort)
        # the fused kernels are verified on CPU only: default on there, opt-in elsewhere
        if fused_ops is None:
            fused_ops = providers == ["CPUExecutionProvider"]
        self.kernel_form = kernel_form(self.onnx_path, int8_block=int8_block, head_scan_bits=head_scan_bits,
                                       head_scan_block=head_scan_block)
        self.graph = self._session_graph(max_context, fused_ops, cache_dir, cache)
        self.fused_ops = self.graph.fused
        self.fused_ops_report = self.graph.report
        report = self.graph.report if isinstance(self.graph.report, dict) else {}
        # a GroupQueryAttention graph updates its cache in place: one buffer per layer (ort_shared_kv)
        self.kv_layout = SHARED if report.get("kv_layout") == SHARED else "concat"
        self._shared: SharedKV | None = None
        self._attention_fill = float(report.get("attention_fill", np.finfo(np.float32).min))
        # the graph's big initializers are references into the export's own file(s)
        so.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                    str(self.graph.weights_dir))
        model_src = self.graph.source()
        with returning_freed_memory(trim_memory):  # ORT's load-time copies do not stay resident
            try:
                self.sess = ort.InferenceSession(model_src, so, providers=providers)
            except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
                if providers != ["CPUExecutionProvider"] and "CPUExecutionProvider" in providers:
                    self.sess = ort.InferenceSession(model_src, so, providers=["CPUExecutionProvider"])
                else:
                    raise ArtifactError(f"ONNX Runtime cannot load {self.onnx_path}: {str(e).splitlines()[0]}") from None
        self.providers = self.sess.get_providers()
        self._logits_index = LOGITS_INDEX in {i.name for i in self.sess.get_inputs()}
        self.device = "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"
        self._check_io()
        self.target_warning = target_warning(self.onnx_path, self.device)
        if self.target_warning and warn:
            print(f"warning: {self.target_warning}", file=sys.stderr)

    @property
    def int8_block(self) -> int:
        return self.kernel_form.int8_block

    def _session_graph(self, max_context: int, fused_ops: bool, cache_dir, cache: bool) -> SessionGraph:
        """The graph to load: the export's, weights left on disk, rewritten when ``fused_ops``
        (made once per export, then read from the cache: see :mod:`.ort_cache`)."""
        try:
            return session_graph(self.onnx_path, max(int(max_context), self.config.max_position_embeddings),
                                 fused=fused_ops, cache_dir=cache_dir, use_cache=cache, form=self.kernel_form)
        except ImportError as e:
            raise BackendUnavailableError(f"{e}: the ONNX Runtime session needs the onnx package "
                                          "(pip install onnx)") from None
        except (OSError, ValueError) as e:
            raise ArtifactError(f"cannot read {self.onnx_path}: {e}; re-export it with `llama-trt export`") from None

    def graph_reads(self):
        """What one decode token reads from this session's initializers (:mod:`..read_bytes`)."""
        if getattr(self, "_reads", None) is None:
            import onnx

            from ..read_bytes import graph_reads

            self._reads = graph_reads(onnx.ModelProto.FromString(self.graph.model_bytes))
        return self._reads

    def _check_io(self) -> None:
        c = self.config
        inputs = {i.name: i for i in self.sess.get_inputs()}
        outputs = {o.name for o in self.sess.get_outputs()}
        mask_inputs = [ATTENTION_BIAS, SEQLENS_K, TOTAL_LENGTH] if self.kv_layout == SHARED else ["attention_mask"]
        need_in = ["input_ids", *mask_inputs, "position_ids"] + [
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
        self._shared = None
        if self.kv_layout == SHARED:
            self._shared = SharedKV(self.sess, self._io, names=self._names, n_kv_heads=c.num_kv_heads,
                                    head_dim=c.head_dim, dtype=self.kv_dtype, batch=batch, capacity=capacity,
                                    vocab_size=c.vocab_size, alloc=self._alloc, ptr=self._ptr,
                                    logits_index=self._logits_index, fill=self._attention_fill)
        elif self.kv_mode == "prealloc":
            n = batch * c.num_kv_heads * capacity * c.head_dim
            # two buffers (A, B) per layer for key and value: [layer][k|v][A|B]
            self._bufs = [[(self._alloc(n), self._alloc(n)) for _ in range(2)] for _ in range(c.num_layers)]
            # raw pointers, looked up once: [layer][k|v][A|B]
            self._ptrs = [[(self._ptr(a), self._ptr(b)) for a, b in layer] for layer in self._bufs]

    def _forward(self, input_ids, attention_mask, position_ids, *, last_only: bool = False) -> np.ndarray:
        if self._shared is not None:
            return self._shared.forward(input_ids, attention_mask, position_ids, self.past_len, last_only)
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
        positions = bind_logits_index(io, self._logits_index, seq, last_only)
        logits = np.empty((b, positions, c.vocab_size), dtype=np.float32)
        io.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        self.sess.run_with_iobinding(io)
        if self.kv_mode == "prealloc":
            self._cur = 1 - self._cur
        else:
            # outputs come back in binding order: present k/v per layer, then logits
            self._presents = list(io.get_outputs())[: 2 * c.num_layers]
        return logits[:, -1:] if last_only and positions != 1 else logits

    def kv_position_offsets(self) -> np.ndarray:
        """Per row, how far the positions its cached keys were rotated by exceed the real ones
        (``[batch]``; non-zero only for rows of a batched prefill in a GroupQueryAttention session,
        see :mod:`.ort_shared_kv`; attention is unchanged by such a shift)."""
        if self._shared is not None:
            return self._shared.offset.reshape(-1).copy()
        return np.zeros(self.batch, dtype=np.int64)

    def kv_cache(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """A numpy copy of the current cache (for tests/debugging): [(key, value)] per layer."""
        if self._shared is not None:
            return self._shared.cache(self.past_len)
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
            "int8_kernel_block": self.int8_block,
            "head_scan_bits": self.kernel_form.head_scan_bits,
            "head_scan_block": self.kernel_form.head_scan_block,
            "fused_ops": self.fused_ops,
            "fused_ops_rewrite": self.fused_ops_report,
            "graph_cache": (f"{'read from' if self.graph.from_cache else 'written to'} {self.graph.cache_file}"
                            if self.graph.cache_file else "off"),
            "weights": f"read by ONNX Runtime from {self.graph.weights_dir} (not copied at open)",
            **({"target_warning": self.target_warning} if self.target_warning else {}),
            **({"cpu_note": note} if (note := cpu_note(self.onnx_path, self.device)) else {}),
            "kv_cache": self._kv_description(),
        }

    def _kv_description(self) -> str:
        if self.kv_layout == SHARED:
            return ("one buffer per layer of the cache's capacity, bound once as past and present; "
                    "GroupQueryAttention writes each step's entries in place (no copy of the past)")
        if self.kv_mode == "prealloc":
            return "preallocated double buffer per layer, bound with IO binding (no numpy copies, no per-token allocation)"
        return "ORT-allocated presents rebound as next past (IO binding, no numpy copies)"

    def close(self) -> None:
        self._bufs = None
        self._presents = None
        self._shared = None
        self.sess = None

