"""INT8 quantization of an fp32 export with explicit QuantizeLinear / DequantizeLinear.

Two schemes (``llama-trt export CKPT -o OUT --quantize SCHEME``):

``int8-weight`` (W8A16, weight-only)
    Every linear layer (q/k/v/o/gate/up/down MatMuls; the lm head by default) gets an int8
    weight initializer with per-output-channel symmetric scales (zero point 0, range
    [-127, 127]) and a ``DequantizeLinear(axis=1)`` in front of its MatMul: for a MatMul
    weight ``B`` of shape [K, N] the output channel is axis 1. Activations stay float.
    Written by our own code: ONNX Runtime's static quantizer always quantizes the
    activation input too, and its weight-only tool (MatMulNBits) emits a com.microsoft
    op / block-wise scales that TensorRT does not take.

``int8-sq`` (W8A8, SmoothQuant, Xiao et al. 2023)
    1. Smoothing (our code): per input channel j of the linears that follow an RMSNorm
       (q/k/v after ``input_layernorm``, gate/up after ``post_attention_layernorm``),
       ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` with ``max|X_j|`` from calibration
       and ``max|W_j|`` over the input row j of all the consumers' weights; the RMSNorm
       weight is divided by ``s`` and the consumers' weight rows multiplied by ``s``. This
       is exact in real arithmetic (rounding only). o_proj and down_proj have no
       preceding norm and are left unsmoothed (smoothing v -> o would be exact but changes
       the V cache the graph returns, so it is not done).
    2. Q/DQ insertion and calibration (ONNX Runtime ``quantize_static``, QDQ format):
       per-tensor symmetric int8 activations on the MatMul inputs (MinMax calibration),
       per-channel symmetric int8 weights on axis 1, no output quantization. Only the
       linear MatMuls are quantized: the attention q.k^T and p.v MatMuls (activation x
       activation) and the KV cache stay fp32, so there are no K/V scales to confuse.

Embeddings (``--quantize-embeddings``, default off for both schemes): int8 table with
per-row scales and ``DequantizeLinear(axis=0) -> Gather``. Off by default because the
embedding is read one row per token (no bandwidth gain at decode) and a runtime without
a DQ->Gather fusion (ONNX Runtime CPU) dequantizes the whole table each step.
LM head (``--quantize-lm-head``): default on for ``int8-weight`` (per-vocab-row weight
scales are accurate and the head is a large share of a small model's bytes), off for
``int8-sq`` (per-tensor int8 activations into the head cost the most accuracy; NVIDIA
ModelOpt also leaves ``lm_head`` unquantized). A tied head gets its own [hidden, vocab]
initializer (the transposed table) so it can be quantized independently.

Graph activations, RMSNorm, RoPE, softmax and the KV cache stay fp32; the plugin nodes
(``llama_trt`` RMSNorm / RotaryEmbedding) and their function bodies are kept as they are.

Library split: ONNX Runtime's ``onnxruntime.quantization`` does the W8A8 Q/DQ insertion
and calibration; NVIDIA ModelOpt 0.47's ONNX extra pins onnx~=1.21 and onnxruntime-gpu
~=1.24 (we run onnx 1.23 / onnxruntime 1.32 CPU), so it is not used. Our code: weight
matching to checkpoint names, smoothing, weight-only Q/DQ, embeddings, checks, manifest.
"""

from __future__ import annotations

import contextlib
import fnmatch
import datetime as _dt
import hashlib
import logging
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ExportError
from .calibration import (
    DEFAULT_SAMPLES, DEFAULT_SEQ_LEN, CalibrationData, builtin_calibration, check_calibration_file,
    load_calibration_file, ort_generate,
)

SCHEMES = ("int8-weight", "int8-sq")
DEFAULT_ALPHA = 0.5
QMAX = 127
CALIB_BATCH = 4
EXTERNAL_DATA_THRESHOLD = 2**31 - 1 - (64 << 20)  # as the exporter: weights > ~2 GB go to external data
QUANTIZE_KWARGS = ("quantize_embeddings", "quantize_lm_head", "sq_alpha", "calib_data", "calib_samples",
                   "calib_seq_len", "seed", "exclude")
_LINEAR_RE = re.compile(r"^(model\.layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)|lm_head)\.weight$")


# ---------------------------------------------------------------------------------------
# options
@dataclass(frozen=True)
class QuantizeOptions:
    scheme: str
    quantize_embeddings: bool | None = None     # None: scheme default (off)
    quantize_lm_head: bool | None = None        # None: scheme default (int8-weight on, int8-sq off)
    sq_alpha: float = DEFAULT_ALPHA
    calib_data: Path | None = None
    calib_samples: int = DEFAULT_SAMPLES
    calib_seq_len: int = DEFAULT_SEQ_LEN
    seed: int = 0
    exclude: tuple[str, ...] = ()               # fnmatch patterns of module names kept in float

    @property
    def embeddings(self) -> bool:
        return bool(self.quantize_embeddings) if self.quantize_embeddings is not None else False

    @property
    def lm_head(self) -> bool:
        if self.quantize_lm_head is not None:
            return bool(self.quantize_lm_head)
        return self.scheme == "int8-weight"

    @property
    def activations(self) -> bool:
        return self.scheme == "int8-sq"


def parse_options(scheme, *, quantize_embeddings=None, quantize_lm_head=None, sq_alpha=None, calib_data=None,
                  calib_samples=None, calib_seq_len=None, seed: int = 0, exclude=()) -> QuantizeOptions:
    """Validate everything that can be checked before any export work; :class:`ExportError` otherwise."""
    if isinstance(scheme, QuantizeOptions):
        return scheme
    if scheme not in SCHEMES:
        raise ExportError(f"unknown --quantize value {scheme!r}: choose one of {', '.join(SCHEMES)}")
    alpha = DEFAULT_ALPHA if sq_alpha is None else sq_alpha
    try:
        alpha = float(alpha)
    except (TypeError, ValueError):
        raise ExportError(f"--sq-alpha must be a number in [0, 1], got {sq_alpha!r}") from None
    if not 0.0 <= alpha <= 1.0:
        raise ExportError(f"--sq-alpha must be in [0, 1], got {alpha}")
    if scheme != "int8-sq" and sq_alpha is not None and alpha != DEFAULT_ALPHA:
        raise ExportError("--sq-alpha only applies to --quantize int8-sq")
    samples = DEFAULT_SAMPLES if calib_samples is None else calib_samples
    seq_len = DEFAULT_SEQ_LEN if calib_seq_len is None else calib_seq_len
    if not isinstance(samples, int) or samples < 1:
        raise ExportError(f"--calib-samples must be a positive integer, got {calib_samples!r}")
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ExportError(f"calibration sequence length must be >= 2, got {calib_seq_len!r}")
    if calib_data is not None:
        if scheme != "int8-sq":
            raise ExportError("--calib-data only applies to --quantize int8-sq (int8-weight needs no calibration)")
        check_calibration_file(calib_data)
        calib_data = Path(calib_data)
    exclude = tuple(str(p) for p in (exclude or ()))
    return QuantizeOptions(scheme, quantize_embeddings, quantize_lm_head, alpha, calib_data, samples, seq_len, seed,
                           exclude)


# ---------------------------------------------------------------------------------------
# graph analysis
@dataclass
class LinearSite:
    name: str           # module name in HF naming: model.layers.0.self_attn.q_proj, lm_head
    node: str           # MatMul node name
    weight: str         # its B initializer ([K, N]) after renaming: <name>.weight_t
    input: str          # activation tensor feeding the MatMul
    shape: tuple[int, int]


@dataclass
class GraphInfo:
    sites: list[LinearSite]
    embedding: tuple[str, str] | None       # (Gather node name, table initializer name)
    attention_matmuls: list[str]            # activation x activation MatMuls (left alone)


def _digest(arr: np.ndarray) -> str:
    a = np.ascontiguousarray(arr, dtype=np.float32)
    return hashlib.sha1(a.tobytes() + str(a.shape).encode()).hexdigest()


def _to_np(t) -> np.ndarray:
    if hasattr(t, "detach"):
        import torch

        return t.detach().to(torch.float32).cpu().numpy()
    return np.asarray(t, dtype=np.float32)


def analyse_graph(model, state_dict) -> GraphInfo:
    """Find the linear MatMuls of ``model`` (fp32 export, edited in place) and name them.

    Weights are matched by value against the checkpoint (``B == W.T``), so the exporter's
    constant names (``val_78``) do not matter. A MatMul whose weight is ``Transpose`` of
    an initializer (the tied lm head) gets its own transposed initializer.
    """
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}

    by_digest: dict[str, str] = {}
    for key, tensor in state_dict.items():
        m = _LINEAR_RE.match(key)
        if m:
            by_digest.setdefault(_digest(_to_np(tensor).T), m.group(1))

    # Materialise Transpose(initializer) weights (tied lm head).
    removed = set()
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] in inits:
            continue
        prod = producers.get(node.input[1])
        if prod is None or prod.op_type != "Transpose" or prod.input[0] not in inits:
            continue
        perm = next((list(a.ints) for a in prod.attribute if a.name == "perm"), [1, 0])
        src = numpy_helper.to_array(inits[prod.input[0]])
        if src.ndim != 2 or perm != [1, 0] or src.dtype != np.float32:
            continue
        new = numpy_helper.from_array(np.ascontiguousarray(src.T), f"{prod.input[0]}_t")
        graph.initializer.append(new)
        inits[new.name] = new
        node.input[1] = new.name
        if not any(prod.output[0] in n.input for n in graph.node) and prod.output[0] not in {o.name for o in graph.output}:
            removed.add(id(prod))
    if removed:
        keep = [n for n in graph.node if id(n) not in removed]
        del graph.node[:]
        graph.node.extend(keep)

    sites, attention, renames = [], [], {}
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        init = inits.get(node.input[1])
        if init is None or len(init.dims) != 2 or init.data_type != 1:
            attention.append(node.name)
            continue
        name = by_digest.get(_digest(numpy_helper.to_array(init)))
        if name is None:
            attention.append(node.name)
            continue
        new_name = f"{name}.weight_t"
        renames[init.name] = new_name
        sites.append(LinearSite(name, node.name, new_name, node.input[0], tuple(int(d) for d in init.dims)))
    for old, new in renames.items():
        inits[old].name = new
        for n in graph.node:
            for i, inp in enumerate(n.input):
                if inp == old:
                    n.input[i] = new

    embedding = None
    for node in graph.node:
        if node.op_type == "Gather" and node.input[0] in {i.name for i in graph.initializer}:
            table = next(i for i in graph.initializer if i.name == node.input[0])
            if len(table.dims) == 2 and table.data_type == 1:
                embedding = (node.name, node.input[0])
                break
    order = {n: i for i, n in enumerate(("q", "k", "v", "o", "gate", "up", "down"))}

    def key(s: LinearSite):
        m = re.match(r"model\.layers\.(\d+)\..*?(\w+)_proj$", s.name)
        return (int(m.group(1)), order[m.group(2)]) if m else (1 << 30, 0)

    sites.sort(key=key)
    return GraphInfo(sites, embedding, attention)


# ---------------------------------------------------------------------------------------
# graph edits (our code)
def _replace_init(graph, name: str, arr: np.ndarray) -> None:
    from onnx import numpy_helper

    for i, init in enumerate(graph.initializer):
        if init.name == name:
            graph.initializer[i].CopyFrom(numpy_helper.from_array(arr, name))
            return
    raise KeyError(name)


def _init_array(graph, name: str) -> np.ndarray:
    from onnx import numpy_helper

    return numpy_helper.to_array(next(i for i in graph.initializer if i.name == name))


def quantize_per_channel(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 (zero point 0, range [-127, 127]) with one scale per index of ``axis``."""
    reduce = tuple(a for a in range(w.ndim) if a != axis % w.ndim)
    amax = np.abs(w).max(axis=reduce).astype(np.float32)
    scale = np.where(amax > 0, amax / QMAX, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.rint(w / scale.reshape(shape)), -QMAX, QMAX).astype(np.int8)
    return q, scale


def add_weight_dq(model, init_name: str, axis: int) -> str:
    """Replace float initializer ``init_name`` by int8 + scale + zero point + DequantizeLinear.

    Returns the DequantizeLinear output, which replaces every use of the initializer.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    w = _init_array(graph, init_name)
    q, scale = quantize_per_channel(w, axis)
    q_name, s_name, z_name = f"{init_name}_quantized", f"{init_name}_scale", f"{init_name}_zero_point"
    out = f"{init_name}_DequantizeLinear_Output"
    # delete in place: rebuilding the repeated field copies every initializer (upb arenas
    # keep the copies alive: a 100M model ran out of memory that way)
    idx = next(i for i, t in enumerate(graph.initializer) if t.name == init_name)
    del graph.initializer[idx]
    graph.initializer.extend([
        numpy_helper.from_array(q, q_name),
        numpy_helper.from_array(scale, s_name),
        numpy_helper.from_array(np.zeros(scale.shape, np.int8), z_name),
    ])
    dq = helper.make_node("DequantizeLinear", [q_name, s_name, z_name], [out], name=f"{init_name}_DequantizeLinear",
                          axis=axis)
    first_use = None
    for idx, n in enumerate(graph.node):
        for i, inp in enumerate(n.input):
            if inp == init_name:
                n.input[i] = out
                first_use = idx if first_use is None else first_use
    graph.node.insert(first_use or 0, dq)
    return out


def activation_absmax(model, manifest, batches, tensors, on_batch=None) -> dict[str, np.ndarray]:
    """max |x| per last-axis channel of each tensor in ``tensors`` over the calibration batches."""
    import onnx
    import onnxruntime as ort

    from .feeds import build_feeds

    m = onnx.ModelProto()
    m.CopyFrom(model)
    existing = {o.name for o in m.graph.output}
    for t in tensors:
        if t not in existing:
            m.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    del m
    out: dict[str, np.ndarray] = {}
    for ids in batches:
        vals = sess.run(list(tensors), build_feeds(manifest, ids))
        for t, v in zip(tensors, vals):
            cur = np.abs(v.reshape(-1, v.shape[-1])).max(axis=0)
            out[t] = cur if t not in out else np.maximum(out[t], cur)
        if on_batch is not None:
            on_batch()
    return out


def smoothing_groups(model, sites: list[LinearSite]) -> list[tuple[str, str, list[LinearSite]]]:
    """(RMSNorm weight initializer, its output, consumer sites) for norms feeding only linear sites."""
    by_input: dict[str, list[LinearSite]] = {}
    for s in sites:
        by_input.setdefault(s.input, []).append(s)
    groups = []
    for node in model.graph.node:
        if node.domain != "llama_trt" or node.op_type != "RMSNorm":
            continue
        y = node.output[0]
        consumers = [n for n in model.graph.node if y in n.input]
        mine = by_input.get(y, [])
        if mine and len(consumers) == len(mine) and all(n.op_type == "MatMul" for n in consumers):
            groups.append((node.input[1], y, mine))
    return groups


def smooth(model, groups, act_max: dict[str, np.ndarray], alpha: float) -> dict[str, dict[str, float]]:
    """SmoothQuant in place: norm weight / s, consumer weight rows * s. Returns per-norm s statistics."""
    graph = model.graph
    stats = {}
    for norm_w, y, consumers in groups:
        ws = [_init_array(graph, c.weight) for c in consumers]
        wmax = np.maximum(np.max(np.stack([np.abs(w).max(axis=1) for w in ws]), axis=0), 1e-5)
        amax = act_max[y].astype(np.float64)
        s = np.where(amax > 0, np.power(amax, alpha) / np.power(wmax.astype(np.float64), 1 - alpha), 1.0)
        s = np.maximum(s, 1e-5).astype(np.float32)
        _replace_init(graph, norm_w, (_init_array(graph, norm_w) / s).astype(np.float32))
        for c, w in zip(consumers, ws):
            _replace_init(graph, c.weight, (w * s[:, None]).astype(np.float32))
        stats[norm_w] = {"min": float(s.min()), "max": float(s.max()), "mean": float(s.mean())}
    return stats


@contextlib.contextmanager
def _quiet():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def ort_quantize_w8a8(in_path: Path, out_path: Path, manifest, batches, nodes: list[str], exclude: list[str],
                      on_batch=None, external_data: bool = False) -> None:
    """ONNX Runtime quantize_static: QDQ, int8 symmetric activations (per tensor) and weights (per channel, axis 1)."""
    from onnxruntime.quantization import (
        CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static,
    )

    from .feeds import build_feeds

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(batches)

        def get_next(self):
            ids = next(self._it, None)
            if ids is None:
                return None
            if on_batch is not None:
                on_batch()
            return build_feeds(manifest, ids)

    with _quiet():
        quantize_static(
            str(in_path), str(out_path), Reader(),
            quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"], per_channel=True, reduce_range=False,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, nodes_to_quantize=list(nodes),
            nodes_to_exclude=list(exclude), calibrate_method=CalibrationMethod.MinMax,
            use_external_data_format=external_data,
            extra_options={
                "ActivationSymmetric": True, "WeightSymmetric": True,
                "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
                "OpTypesToExcludeOutputQuantization": ["MatMul"],
            },
        )


# ---------------------------------------------------------------------------------------
# inspection (used by the exporter's own check and by tests)
def inspect_quantized(model) -> dict[str, Any]:
    """Q/DQ facts of a graph: int8 initializers, DQ nodes (axis, scale shape), activation Q nodes, zero points."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    dq, q_nodes = [], []
    for n in graph.node:
        if n.op_type == "DequantizeLinear":
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            src = n.input[0]
            dq.append({
                "node": n.name, "input": src, "weight": src in inits, "axis": int(axis),
                "scale": n.input[1], "scale_shape": list(inits[n.input[1]].dims) if n.input[1] in inits else None,
                "scale_dtype": int(inits[n.input[1]].data_type) if n.input[1] in inits else None,
                "zero_point": n.input[2] if len(n.input) > 2 else None,
            })
        elif n.op_type == "QuantizeLinear":
            q_nodes.append({"node": n.name, "input": n.input[0], "scale": n.input[1]})
    zps = [numpy_helper.to_array(inits[d["zero_point"]]) for d in dq if d["zero_point"] in inits]
    return {
        "int8_initializers": sorted(i.name for i in graph.initializer if i.data_type == 3),
        "dequantize": dq,
        "quantize": q_nodes,
        "zero_points_all_zero": all(not np.any(z) for z in zps),
        "functions": sorted(f.name for f in model.functions),
        "plugin_nodes": sum(1 for n in graph.node if n.domain == "llama_trt"),
    }


def _check_no_float_copies(model, originals: dict[str, str], allowed=()) -> None:
    """No float initializer equals (or is the transpose of) a quantized weight.

    ``allowed``: initializers that legitimately stay float (a tied embedding table that is
    not quantized while the lm head is)."""
    from onnx import numpy_helper

    left = []
    for init in model.graph.initializer:
        if init.data_type not in (1, 10, 16) or len(init.dims) != 2 or init.name in allowed:
            continue
        arr = numpy_helper.to_array(init)
        for d in (_digest(arr), _digest(arr.T)):
            if d in originals:
                left.append(f"{init.name} (= {originals[d]})")
    if left:
        raise ExportError(f"internal error: float copies of quantized weights remain: {', '.join(left[:4])}")


# ---------------------------------------------------------------------------------------
# progress
class _Progress:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._p = None

    def __enter__(self):
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._p = Progress(TextColumn("[bold]quantize[/bold] {task.description}"), BarColumn(),
                               MofNCompleteColumn(), TimeElapsedColumn(), console=Console(stderr=True))
            self._p.__enter__()
        return self

    def task(self, description: str, total: int):
        if self._p is None:
            return lambda: None
        tid = self._p.add_task(description, total=total)
        return lambda: self._p.advance(tid)

    def __exit__(self, *exc):
        if self._p is not None:
            self._p.__exit__(*exc)
        return False


# ---------------------------------------------------------------------------------------
def _batches(tokens: np.ndarray, size: int = CALIB_BATCH) -> list[np.ndarray]:
    return [tokens[i:i + size] for i in range(0, len(tokens), size)]


def quantize_folder(base_dir, out_dir, options: QuantizeOptions, *, state_dict=None, tokenizer_files=(),
                    progress: bool = False, ort_check: bool = True):
    """Quantize the fp32 export in ``base_dir`` into ``out_dir`` (an existing empty folder).

    Returns the new :class:`ExportManifest` (dtype "int8", ``quantization`` filled in).
    """
    import onnx

    from ..plugins.onnx_support import register_all_schemas
    from .core import check_exported
    from .feeds import ort_session
    from .manifest import MANIFEST_NAME, MODEL_NAME, load_manifest

    register_all_schemas()
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    base = load_manifest(base_dir)
    if base.dtype != "fp32":
        raise ExportError(f"int8 quantization starts from an fp32 export; {base_dir} is {base.dtype}")
    if state_dict is None:
        from ..checkpoint import load_checkpoint

        state_dict = load_checkpoint(base.source_checkpoint).state_dict
    cfg = base.config
    model = onnx.load(str(base.model_path(base_dir)))
    info = analyse_graph(model, state_dict)
    originals = {}
    for s in info.sites:
        originals[_digest(_init_array(model.graph, s.weight))] = s.name
    del state_dict

    quantized, excluded = [], []
    sites = []
    for s in info.sites:
        if s.name == "lm_head" and not options.lm_head:
            excluded.append({"name": s.name, "reason": "lm head not quantized (--quantize-lm-head to change)"})
        elif any(fnmatch.fnmatchcase(s.name, p) for p in options.exclude):
            excluded.append({"name": s.name, "reason": "kept in float by --quantize-exclude"})
        else:
            sites.append(s)
    for node in info.attention_matmuls:
        excluded.append({"name": node, "reason": "attention matmul (activation x activation; KV cache stays fp32)"})
    if info.embedding is not None and not options.embeddings:
        excluded.append({"name": "model.embed_tokens", "reason": "embedding not quantized (--quantize-embeddings to change)"})
    if options.lm_head and not any(s.name == "lm_head" for s in info.sites):
        raise ExportError("internal error: the lm head MatMul was not found in the export")
    # Only the weights actually quantized must not survive as float copies.
    originals = {d: n for d, n in originals.items() if any(s.name == n for s in sites)}

    calib: CalibrationData | None = None
    smoothing: dict[str, Any] | None = None
    with _Progress(progress) as prog, tempfile.TemporaryDirectory(prefix=".quantize-", dir=out_dir) as work:
        work = Path(work)
        if options.activations:
            if options.calib_data is not None:
                calib = load_calibration_file(
                    options.calib_data, vocab_size=int(cfg["vocab_size"]), samples=options.calib_samples,
                    seq_len=options.calib_seq_len, tokenizer_files=tokenizer_files, bos=cfg.get("bos_token_id"))
            else:
                sess = ort_session(base_dir)
                steps = max(0, options.calib_seq_len - 1 - 3)
                calib = builtin_calibration(sess, base, samples=options.calib_samples, seq_len=options.calib_seq_len,
                                            seed=options.seed, on_step=prog.task("generate calibration text", steps))
                del sess
            batches = _batches(calib.tokens)
            groups = smoothing_groups(model, sites)
            act = activation_absmax(model, base, batches, sorted({g[1] for g in groups}),
                                    on_batch=prog.task("activation statistics", len(batches)))
            stats = smooth(model, groups, act, options.sq_alpha)
            smoothing = {
                "alpha": options.sq_alpha,
                "smoothed_norms": sorted(stats),
                "smoothed_layers": [c.name for g in groups for c in g[2]],
                "unsmoothed_layers": [s.name for s in sites if s.name not in {c.name for g in groups for c in g[2]}],
                "scale_stats": stats,
            }
            external = model.ByteSize() > EXTERNAL_DATA_THRESHOLD
            smoothed_path = work / "smoothed.onnx"
            onnx.save(model, str(smoothed_path), save_as_external_data=external)
            del model
            qpath = work / MODEL_NAME
            nodes = [s.node for s in sites]
            skip = [n for n in info.attention_matmuls] + [s.node for s in info.sites if s not in sites]
            ort_quantize_w8a8(smoothed_path, qpath, base, batches, nodes, skip,
                              on_batch=prog.task("calibrate + insert Q/DQ (onnxruntime)", len(batches)),
                              external_data=external)
            model = onnx.load(str(qpath))
        else:
            for s in sites:
                add_weight_dq(model, s.weight, axis=1)
        if info.embedding is not None and options.embeddings:
            add_weight_dq(model, info.embedding[1], axis=0)
        quantized = [s.name for s in sites] + (["model.embed_tokens"] if info.embedding and options.embeddings else [])

        # keep the base model's metadata, mark it int8
        meta = {p.key: p.value for p in model.metadata_props}
        meta["llama_trt.dtype"] = "int8"
        meta["llama_trt.quantization"] = options.scheme
        del model.metadata_props[:]
        for k, v in meta.items():
            model.metadata_props.add(key=k, value=v)
        model.producer_name = "llama-trt"

        facts = inspect_quantized(model)
        if sorted(f.name for f in model.functions) != sorted(p.op_type for p in base.plugin_ops) or \
                facts["plugin_nodes"] != sum(p.count for p in base.plugin_ops):
            raise ExportError("internal error: llama_trt plugin nodes or functions were lost in quantization")
        if not facts["zero_points_all_zero"]:
            raise ExportError("internal error: a quantization zero point is not 0 (TensorRT needs symmetric int8)")
        keep_float = [info.embedding[1]] if info.embedding is not None and not options.embeddings else []
        _check_no_float_copies(model, originals, keep_float)

        external = model.ByteSize() > EXTERNAL_DATA_THRESHOLD
        from .manifest import EXTERNAL_DATA_NAME

        for f in (MODEL_NAME, EXTERNAL_DATA_NAME):
            (out_dir / f).unlink(missing_ok=True)
        onnx.save(model, str(out_dir / MODEL_NAME), save_as_external_data=external,
                  location=EXTERNAL_DATA_NAME, all_tensors_to_one_file=True)
        del model

    weights_desc = {"dtype": "int8", "granularity": "per-channel", "axis": 1, "symmetric": True, "zero_point": 0,
                    "range": [-QMAX, QMAX], "inserted_by": "onnxruntime.quantization" if options.activations else "llama_trt"}
    import onnxruntime

    record = {
        "scheme": options.scheme,
        "format": "QDQ",
        "compute_dtype": "float32",
        "weights": weights_desc,
        "activations": ({"dtype": "int8", "granularity": "per-tensor", "symmetric": True, "zero_point": 0,
                         "calibration": "minmax", "inserted_by": "onnxruntime.quantization"}
                        if options.activations else None),
        "sq_alpha": options.sq_alpha if options.activations else None,
        "smoothing": smoothing,
        "calibration": calib.to_dict() if calib is not None else None,
        "quantize_embeddings": bool(options.embeddings),
        "quantize_lm_head": bool(options.lm_head),
        "quantized": quantized,
        "excluded": excluded,
        "library": {"onnxruntime": onnxruntime.__version__},
        "base_model_bytes": base.model_bytes,
    }
    size = sum(f.stat().st_size for f in out_dir.iterdir() if f.is_file() and f.name != MANIFEST_NAME)
    manifest = replace(
        base, dtype="int8", quantization=record, model_bytes=size,
        external_data=EXTERNAL_DATA_NAME if external else None,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )
    check_exported(out_dir, manifest, ort_smoke=ort_check)
    (out_dir / MANIFEST_NAME).write_text(manifest.to_json())
    return manifest


def export_quantized(checkpoint, out_dir, options: QuantizeOptions, *, dtype: str = "fp32", opset: int = 23,
                     force: bool = False, progress: bool = False, ort_check: bool = True):
    """fp32 export into a temporary folder, quantize, move into ``out_dir`` (nothing left on failure)."""
    from ..checkpoint import detect_format, load_checkpoint
    from ..checkpoint.hub import resolve_checkpoint
    from ..config import Precision
    from .core import _move_into_place, _prepare_out_dir, export as fp_export

    if Precision.parse(dtype) is not Precision.FP32:
        raise ExportError(f"--quantize {options.scheme} needs --dtype fp32 (the int8 graph keeps fp32 activations); "
                          f"got --dtype {dtype}")
    checkpoint = resolve_checkpoint(checkpoint)  # a Hugging Face id -> its cached snapshot
    out_dir = Path(out_dir).absolute()
    detect_format(checkpoint)
    tmp = _prepare_out_dir(out_dir, force)
    try:
        base_dir = tmp / "fp32-base"
        fp_export(checkpoint, base_dir, dtype="fp32", opset=opset, force=False, progress=progress, ort_check=False)
        ckpt = load_checkpoint(checkpoint)
        manifest = quantize_folder(base_dir, tmp, options, state_dict=ckpt.state_dict,
                                   tokenizer_files=ckpt.tokenizer_files, progress=progress, ort_check=ort_check)
        for f in ckpt.tokenizer_files:
            shutil.copy2(f, tmp / Path(f).name)
        shutil.rmtree(base_dir)
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


# ---------------------------------------------------------------------------------------
# accuracy
def heldout_tokens(reference_dir, length: int = 128, seed: int = 1234) -> np.ndarray:
    """Held-out text: a seeded sample (T = 1) of the fp32 reference export from BOS.

    Seed 1234 and a plain BOS start keep it apart from the calibration text (seed 0,
    BOS + random tokens)."""
    from .feeds import ort_session
    from .manifest import load_manifest

    man = load_manifest(reference_dir)
    bos = man.config.get("bos_token_id") or 0
    return ort_generate(ort_session(reference_dir), man, np.array([[bos]], np.int64), length - 1,
                        rng=np.random.default_rng(seed))[0]


def accuracy_report(reference_dir, candidate_dirs, *, heldout=None, greedy_steps: int = 64,
                    heldout_len: int = 128, exact: bool = False) -> dict[str, Any]:
    """Perplexity, top-1 agreement, KL and greedy agreement of each candidate export vs the reference.

    Metric functions come from :mod:`llama_trt.validate.metrics` (written by the validate
    stage); ``greedy_teacher_forced`` is ours. Teacher-forced metrics (perplexity, top-1, KL)
    run one prefill over the held-out tokens (default: :func:`heldout_tokens`). Greedy:
    ``greedy_agreement`` compares ``greedy_steps`` tokens generated from BOS by each model
    on its own (KV cache; one flip costs every later step); ``greedy_teacher_forced`` is
    the fraction of steps of the reference's greedy sequence where the candidate, fed that
    same sequence, picks the same token (no cascade).

    ``exact``: run ONNX Runtime with ``session.qdq_matmulnbits_accuracy_level=1`` so a
    DequantizeLinear->MatMul that ORT fuses into MatMulNBits computes in fp32 (the graph's
    own semantics); by default ORT (1.32, CPU) uses level 4 there, i.e. it quantizes the
    activations of weight-only layers to int8 on the fly.
    """
    import onnxruntime as ort

    from ..validate.metrics import greedy_agreement, kl_divergence, perplexity, top1_matches
    from .feeds import build_feeds, split_outputs
    from .manifest import load_manifest

    ref_man = load_manifest(reference_dir)
    tokens = heldout_tokens(reference_dir, heldout_len) if heldout is None else np.asarray(heldout, np.int64)
    bos = ref_man.config.get("bos_token_id") or 0

    def open_session(folder, man):
        o = ort.SessionOptions()
        o.log_severity_level = 3
        if exact:
            o.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
        return ort.InferenceSession(str(man.model_path(folder)), o, providers=["CPUExecutionProvider"])

    def run(folder):
        man = load_manifest(folder)
        sess = open_session(folder, man)
        logits, _ = split_outputs(man, sess.run(None, build_feeds(man, tokens[None])))
        greedy = ort_generate(sess, man, np.array([[bos]], np.int64), greedy_steps)[0, 1:]
        return man, sess, logits[0], greedy

    _, _, ref_logits, ref_greedy = run(reference_dir)
    ref_traj = np.concatenate([[bos], ref_greedy])[None].astype(np.int64)
    ref_ppl = perplexity(ref_logits, tokens)
    out = {"reference": str(reference_dir), "heldout_tokens": int(tokens.size), "greedy_steps": greedy_steps,
           "exact": exact, "reference_perplexity": ref_ppl, "candidates": {}}
    for folder in ([candidate_dirs] if isinstance(candidate_dirs, (str, Path)) else candidate_dirs):
        man, sess, logits, greedy = run(folder)
        traj_logits, _ = split_outputs(man, sess.run(None, build_feeds(man, ref_traj)))
        tf = float((traj_logits[0, :-1].argmax(-1) == ref_greedy).mean())
        ppl = perplexity(logits, tokens)
        kl = kl_divergence(ref_logits, logits)
        agree, first = greedy_agreement(ref_greedy.tolist(), greedy.tolist())
        scheme = (getattr(man, "quantization", None) or {}).get("scheme", man.dtype)
        out["candidates"][str(folder)] = {
            "scheme": scheme,
            "perplexity": ppl,
            "perplexity_ratio": ppl / ref_ppl,
            "top1_agreement": float(top1_matches(ref_logits, logits).mean()),
            "kl_mean": float(kl.mean()),
            "kl_max": float(kl.max()),
            "greedy_agreement": agree,
            "greedy_first_divergence": first,
            "greedy_teacher_forced": tf,
            "model_bytes": man.model_bytes,
        }
    return out


__all__ = [
    "GraphInfo", "LinearSite", "QuantizeOptions", "SCHEMES", "accuracy_report", "activation_absmax",
    "add_weight_dq", "analyse_graph", "export_quantized", "heldout_tokens", "inspect_quantized",
    "parse_options", "quantize_folder", "quantize_per_channel", "smooth", "smoothing_groups",
]
