"""What the exporter needs from a fused op's ``onnx_function.py``, and helpers shared by them.

Every plugin folder ``llama_trt/plugins/<torch_name>/`` has an ``onnx_function.py`` with:

* ``schema() -> onnx.defs.OpSchema``: the node's signature (domain ``llama_trt``);
* ``function_proto(opset) -> onnx.FunctionProto``: a reference body in standard ONNX
  ops with attribute references, so ONNX Runtime (and any tool that inlines local
  functions) runs the node;
* ``translation``: the torch -> ONNX translation for the exporter's
  ``custom_translation_table`` (it emits one ``llama_trt`` node);
* ``torch_op()``: the torch op overload that ``translation`` replaces.

:func:`onnx_parts` finds that module from a :class:`FusedOpSpec`, so the exporter only
iterates over :func:`llama_trt.plugins.all_specs`.
"""

from __future__ import annotations

import importlib
import threading
from types import ModuleType

from .spec import DOMAIN, FusedOpSpec

_LOCK = threading.Lock()
_REGISTERED: set[tuple[str, str, int]] = set()


def onnx_parts(spec: FusedOpSpec) -> ModuleType:
    """The ``onnx_function`` module of ``spec`` (folder name = ``spec.torch_name``)."""
    return importlib.import_module(f"{__package__}.{spec.torch_name}.onnx_function")


def ensure_schema(schema_factory) -> None:
    """Register an OpSchema with ONNX once per process (idempotent, thread-safe).

    A schema that ONNX already knows (registered by an earlier call or another
    import path) is left alone.
    """
    import onnx
    # onnx.reference builds a name -> schema table once, at import, and refuses an op
    # name that exists in two domains (our RotaryEmbedding vs opset-23 RotaryEmbedding).
    # Import it before registering so it (and onnxscript, which imports it) keeps working.
    import onnx.reference  # noqa: F401

    schema = schema_factory()
    key = (schema.domain, schema.name, schema.since_version)
    with _LOCK:
        if key in _REGISTERED:
            return
        try:
            onnx.defs.get_schema(schema.name, schema.since_version, schema.domain)
        except onnx.defs.SchemaError:
            onnx.defs.register_schema(schema)
        _REGISTERED.add(key)


def register_all_schemas() -> None:
    from . import all_specs

    for spec in all_specs():
        ensure_schema(onnx_parts(spec).schema)


def custom_opset(version: int = 1):
    """onnxscript Opset for the ``llama_trt`` domain (schemas must be registered first)."""
    import onnxscript

    return onnxscript.values.Opset(DOMAIN, version)


def attr_ref(name: str, ref: str, attr_type):
    """An AttributeProto that refers to a function attribute (``ref_attr_name``)."""
    import onnx

    a = onnx.AttributeProto()
    a.name = name
    a.ref_attr_name = ref
    a.type = attr_type
    return a


def node_with_ref(op_type: str, inputs, outputs, **refs):
    """A node whose attributes are references: ``refs`` maps attr name -> (ref name, type)."""
    import onnx

    node = onnx.helper.make_node(op_type, inputs, outputs)
    for attr, (ref, attr_type) in refs.items():
        node.attribute.append(attr_ref(attr, ref, attr_type))
    return node


FLOAT_TYPES = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
