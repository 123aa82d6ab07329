"""Route the ``llama_trt`` fused-op nodes for a TensorRT build: a pure ONNX graph pass.

Three routes per op:

* ``plugin``: full TensorRT with our ``tensorrt.plugin`` registrations. The node stays
  and gets ``plugin_namespace="llama_trt"``, so the ONNX parser asks the plugin registry
  first (instead of inlining the function body).
* ``native``: rewritten to a standard opset-23 op the parser maps to a native layer.
  ``llama_trt.RotaryEmbedding(X, position_ids, inv_freq)`` becomes
  ``RotaryEmbedding(X, cos_cache, sin_cache, position_ids)`` (one ROTARY_EMBEDDING layer
  in TensorRT >= 10.15 and TensorRT-RTX), with ``[max_context, rotary_dim/2]`` caches
  computed from the node's constant ``inv_freq`` in float64 and cast to X's dtype.
  ``llama_trt.RMSNorm`` becomes ``RMSNormalization`` (only on request: TensorRT
  decomposes it anyway, so it gains nothing over the function body).
* ``function``: left alone; the parser inlines the node's ONNX function body.

:func:`lower_model` never imports TensorRT, so the pass is tested with ONNX Runtime.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..errors import BuildError
from ..plugins.spec import DOMAIN

ROPE = "RotaryEmbedding"
RMS = "RMSNorm"
PLUGIN = "plugin"
NATIVE = "native"
FUNCTION = "function"
ROUTES = (PLUGIN, NATIVE, FUNCTION)
MIN_NATIVE_OPSET = 23

_TARGETS = {
    (ROPE, PLUGIN): "TensorRT plugin llama_trt::RotaryEmbedding (PLUGIN_V3 layers)",
    (ROPE, NATIVE): "ONNX RotaryEmbedding (opset 23) -> native ROTARY_EMBEDDING layers",
    (ROPE, FUNCTION): "ONNX function body, inlined by the parser",
    (RMS, PLUGIN): "TensorRT plugin llama_trt::RMSNorm (PLUGIN_V3 layers)",
    (RMS, NATIVE): "ONNX RMSNormalization (opset 23) -> decomposed by TensorRT (no fused layer)",
    (RMS, FUNCTION): "ONNX function body, inlined by the parser (REDUCE/UNARY/ELEMENTWISE layers)",
}


@dataclass(frozen=True)
class OpRoute:
    """Where one fused op went: ``route`` in plugin / native / function."""

    op: str                 # "llama_trt.RotaryEmbedding"
    count: int              # nodes in the graph
    route: str
    target: str             # human-readable destination
    trt_layers: int | None = None  # matching layers in the parsed network (None: not checked)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "OpRoute":
        return cls(op=d["op"], count=int(d["count"]), route=d["route"], target=d["target"],
                   trt_layers=d.get("trt_layers"))


@dataclass(frozen=True)
class LoweringOptions:
    """``plugins``: route every llama_trt node to its plugin (full TensorRT only);
    otherwise RoPE -> ONNX RotaryEmbedding and RMSNorm -> function body, or ONNX
    RMSNormalization when ``rms_norm_native``."""

    max_context: int
    plugins: bool = False
    rms_norm_native: bool = False

    def route_for(self, op_type: str) -> str:
        if self.plugins:
            return PLUGIN
        if op_type == ROPE:
            return NATIVE
        if op_type == RMS:
            return NATIVE if self.rms_norm_native else FUNCTION
        return FUNCTION


def rope_caches(inv_freq: np.ndarray, max_context: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [max_context, len(inv_freq)]: angles in float64, cast to ``dtype`` last."""
    pos = np.arange(int(max_context), dtype=np.float64)[:, None]
    angles = pos * np.asarray(inv_freq, dtype=np.float64)[None, :]
    return np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)


# ----------------------------------------------------------------------------- helpers


def _attrs(node) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _constant_values(graph) -> dict[str, Any]:
    """name -> numpy array for initializers and Constant(value=...) outputs."""
    from onnx import numpy_helper

    out: dict[str, Any] = {i.name: i for i in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = a.t
    return {k: (lambda t=v: numpy_helper.to_array(t)) for k, v in out.items()}


def _elem_types(model) -> dict[str, int]:
    """Known element types of graph values (inputs, outputs, value_info, initializers)."""
    g = model.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in (*g.input, *g.output, *g.value_info)
             if vi.type.HasField("tensor_type")}
    types.update({i.name: i.data_type for i in g.initializer})
    return {k: v for k, v in types.items() if v}


def activation_elem_type(model) -> int:
    """The model's activation type: that of the KV cache inputs (float32 if none)."""
    from onnx import TensorProto

    for vi in model.graph.input:
        if vi.name.startswith("past_key_values."):
            return vi.type.tensor_type.elem_type
    return TensorProto.FLOAT


def default_opset(model) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    return 0


def count_fused_nodes(model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in model.graph.node:
        if n.domain == DOMAIN:
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def has_qdq(model) -> bool:
    """True when the graph (or a local function) holds QuantizeLinear/DequantizeLinear."""
    qdq = ("QuantizeLinear", "DequantizeLinear")
    if any(n.op_type in qdq for n in model.graph.node):
        return True
    return any(n.op_type in qdq for f in model.functions for n in f.node)


def detect_precision(model) -> str:
    """fp32 / fp16 from the activation type; int8 when Q/DQ nodes are present, int4 when
    some of their weights are 4-bit."""
    from onnx import TensorProto

    if has_qdq(model):
        four = (TensorProto.INT4, TensorProto.UINT4)
        return "int4" if any(i.data_type in four for i in model.graph.initializer) else "int8"
    t = activation_elem_type(model)
    return {TensorProto.FLOAT16: "fp16", TensorProto.BFLOAT16: "bf16"}.get(t, "fp32")


# ----------------------------------------------------------------------------- the pass


def lower_model(model, options: LoweringOptions):
    """Return ``(lowered copy, [OpRoute])``; ``model`` is not modified.

    Raises :class:`BuildError` naming the node when a node cannot be lowered
    (e.g. a RotaryEmbedding whose ``inv_freq`` is not a constant).
    """
    import onnx
    from onnx import helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    counts = count_fused_nodes(out)
    routes = {op: options.route_for(op) for op in counts}
    if NATIVE in routes.values() and default_opset(out) < MIN_NATIVE_OPSET:
        raise BuildError(
            f"the ONNX model imports opset {default_opset(out)}; native RotaryEmbedding/RMSNormalization need "
            f"opset >= {MIN_NATIVE_OPSET}: re-export with --opset {MIN_NATIVE_OPSET}"
        )
    consts = _constant_values(g)
    types = _elem_types(out)
    act_type = activation_elem_type(out)
    caches: dict[tuple, tuple[str, str]] = {}
    new_nodes = []
    for node in g.node:
        if node.domain != DOMAIN:
            new_nodes.append(node)
            continue
        route = routes[node.op_type]
        label = f"{node.name or node.output[0]!r} ({DOMAIN}.{node.op_type})"
        if route == PLUGIN:
            n = onnx.NodeProto()
            n.CopyFrom(node)
            if not any(a.name == "plugin_namespace" for a in n.attribute):
                n.attribute.append(helper.make_attribute("plugin_namespace", DOMAIN))
            new_nodes.append(n)
        elif route == FUNCTION:
            new_nodes.append(node)
        elif node.op_type == ROPE:
            new_nodes.append(_native_rope(node, label, consts, types, act_type, options, caches, g))
        elif node.op_type == RMS:
            new_nodes.append(_native_rms(node, label, consts, types, act_type, g))
        else:
            raise BuildError(f"node {label}: no native lowering for {node.op_type}; build with plugins")
    del g.node[:]
    g.node.extend(new_nodes)
    _drop_unused(out)
    result = [OpRoute(f"{DOMAIN}.{op}", n, routes[op], _TARGETS.get((op, routes[op]), routes[op]))
              for op, n in sorted(counts.items())]
    return out, result


def _native_rope(node, label, consts, types, act_type, options, caches, graph):
    from onnx import helper, numpy_helper

    if len(node.input) < 3:
        raise BuildError(f"node {label}: expected inputs (X, position_ids, inv_freq), got {list(node.input)}")
    x, pos, inv_name = node.input[:3]
    if inv_name not in consts:
        raise BuildError(
            f"node {label}: inv_freq {inv_name!r} is not an initializer or Constant, so cos/sin caches "
            "cannot be precomputed; build with plugins or re-export"
        )
    inv = np.asarray(consts[inv_name](), dtype=np.float64).reshape(-1)
    attrs = _attrs(node)
    rotary_dim = int(attrs.get("rotary_dim", 2 * inv.size))
    if rotary_dim != 2 * inv.size:
        raise BuildError(f"node {label}: rotary_dim {rotary_dim} != 2 * len(inv_freq) ({2 * inv.size})")
    elem = types.get(x, act_type)
    np_dtype = helper.tensor_dtype_to_np_dtype(elem)
    key = (inv.tobytes(), int(elem))
    if key not in caches:
        k = len(caches)
        cos_name, sin_name = f"llama_trt.rope_cos_cache.{k}", f"llama_trt.rope_sin_cache.{k}"
        cos, sin = rope_caches(inv, options.max_context, np_dtype)
        graph.initializer.extend([numpy_helper.from_array(cos, cos_name), numpy_helper.from_array(sin, sin_name)])
        caches[key] = (cos_name, sin_name)
    cos_name, sin_name = caches[key]
    return helper.make_node(
        "RotaryEmbedding", [x, cos_name, sin_name, pos], list(node.output),
        name=node.name, interleaved=int(attrs.get("interleaved", 0)), rotary_embedding_dim=rotary_dim,
    )


def _native_rms(node, label, consts, types, act_type, graph):
    from onnx import helper, numpy_helper

    x, w = node.input[:2]
    eps = float(_attrs(node).get("epsilon", 1e-5))
    x_type = types.get(x, act_type)
    scale = w
    if types.get(w, x_type) != x_type:  # RMSNormalization's output type is the scale's type
        if w not in consts:
            raise BuildError(f"node {label}: weight {w!r} has another dtype than X and is not a constant")
        arr = consts[w]().astype(helper.tensor_dtype_to_np_dtype(x_type))
        scale = f"{w}.as_activation_dtype"
        if not any(i.name == scale for i in graph.initializer):
            graph.initializer.append(numpy_helper.from_array(arr, scale))
    return helper.make_node("RMSNormalization", [x, scale], list(node.output), name=node.name,
                            axis=-1, epsilon=eps, stash_type=1)


def _names_read(nodes) -> set[str]:
    """Inputs of ``nodes`` and of the nodes of their subgraphs (outer-scope reads included)."""
    from onnx import AttributeProto

    out: set[str] = set()
    for n in nodes:
        out.update(n.input)
        for a in n.attribute:
            if a.type == AttributeProto.GRAPH:
                out |= _names_read(a.g.node)
            elif a.type == AttributeProto.GRAPHS:
                for sub in a.graphs:
                    out |= _names_read(sub.node)
    return out


def _drop_unused(model) -> None:
    """Remove functions no node calls and initializers / Constants nothing reads."""
    g = model.graph
    used_fns = {(n.domain, n.op_type) for n in g.node}
    keep = [f for f in model.functions if (f.domain, f.name) in used_fns]
    if len(keep) != len(model.functions):
        del model.functions[:]
        model.functions.extend(keep)
    if not any(n.domain == DOMAIN for n in g.node):
        keep_ops = [o for o in model.opset_import if o.domain != DOMAIN]
        del model.opset_import[:]
        model.opset_import.extend(keep_ops)
    read = _names_read(g.node) | {o.name for o in g.output}
    for f in model.functions:
        read |= _names_read(f.node)
    inits = [i for i in g.initializer if i.name in read]
    if len(inits) != len(g.initializer):
        del g.initializer[:]
        g.initializer.extend(inits)
    nodes = [n for n in g.node if not (n.op_type == "Constant" and n.output[0] not in read)]
    if len(nodes) != len(g.node):
        del g.node[:]
        g.node.extend(nodes)


__all__ = [
    "FUNCTION", "LoweringOptions", "NATIVE", "OpRoute", "PLUGIN", "ROUTES", "count_fused_nodes",
    "detect_precision", "has_qdq", "lower_model", "rope_caches",
]
