"""Small graph-editing helpers shared by the ONNX Runtime session rewrites (:mod:`.ort_lowering`,
:mod:`.ort_attention`): producer/consumer maps, attribute reads, in-order node splicing, dead-node
removal."""

from __future__ import annotations

import numpy as np

from ...trt_engines.lowering import _constant_values, _names_read


def _splice(g, replace: dict[int, list] | None = None, drop=()) -> None:
    """Rewrite ``g.node`` in order: a node whose id is in ``replace`` gives way to that list of
    nodes (which may include itself), one in ``drop`` goes, every other node stays."""
    replace = replace or {}
    new_nodes = []
    for n in g.node:
        if id(n) in replace:
            new_nodes.extend(replace[id(n)])
        elif id(n) not in drop:
            new_nodes.append(n)
    del g.node[:]
    g.node.extend(new_nodes)


class _Graph:
    def __init__(self, graph) -> None:
        self.g = graph
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.consts = _constant_values(graph)

    def prod(self, name, op_type):
        n = self.producer.get(name)
        return n if n is not None and n.op_type == op_type and n.domain in ("", "ai.onnx") else None

    def const(self, name):
        f = self.consts.get(name)
        return None if f is None else np.asarray(f())


def _attr(node, name, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _remove_dead_nodes(model) -> None:
    g = model.graph
    outputs = {o.name for o in g.output}
    nodes = list(g.node)
    while True:
        read = _names_read(nodes) | outputs
        keep = [n for n in nodes if any(o in read for o in n.output if o)]
        if len(keep) == len(nodes):
            break
        nodes = keep
    if len(nodes) != len(g.node):
        del g.node[:]
        g.node.extend(nodes)


def readers(graph) -> dict[str, list]:
    """Value name -> the nodes that read it (in graph order)."""
    out: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def unshared_name(name: str, node) -> str:
    """The name of ``node``'s own entry for initializer ``name`` (ort_lowering's
    ``_unshare_quantized_weights``; ort_head maps it back)."""
    return f"{name}.{node.name or node.output[0]}"


def unshared_original(name: str, node) -> str | None:
    """The initializer ``name`` is ``node``'s own entry for (:func:`unshared_name` reversed), or None."""
    suffix = unshared_name("", node)
    return name.removesuffix(suffix) if name.endswith(suffix) else None


def use_ms_domain(model) -> None:
    """Import the ``com.microsoft`` opset (ONNX Runtime's contrib ops) if the model does not yet."""
    from onnx import helper

    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


__all__ = ["_Graph", "_attr", "_remove_dead_nodes", "_splice", "readers", "unshared_name", "unshared_original",
           "use_ms_domain"]
