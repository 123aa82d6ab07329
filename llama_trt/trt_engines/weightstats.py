"""How many bytes of weights an engine holds, and in which types.

Two measures, both taken during the build (a plan cannot be deserialized, nor inspected
with ``IEngineInspector``, without a GPU, and TensorRT-RTX builds ahead of time on CPU):

* ``weight_bytes``: the builder's own figure, its ``Total Weights Memory: N bytes`` log line
  (INFO) for the serialized engine: the weights as stored in the plan, after constant
  folding and type decisions;
* ``network_weight_bytes``: the constants of the parsed network by element type (what the
  builder was given: int8 / int4 weights stay visible here as such).
"""

from __future__ import annotations

import re

_TOTAL_RE = re.compile(r"Total Weights Memory:\s*(\d+)\s*bytes")
_BITS = {"FLOAT": 32, "HALF": 16, "BF16": 16, "INT8": 8, "UINT8": 8, "BOOL": 8, "FP8": 8, "INT4": 4, "FP4": 4,
         "INT32": 32, "INT64": 64, "E8M0": 8}
_NAMES = {"FLOAT": "fp32", "HALF": "fp16", "BF16": "bf16", "INT8": "int8", "UINT8": "uint8", "INT4": "int4",
          "FP8": "fp8", "FP4": "fp4", "INT32": "int32", "INT64": "int64", "BOOL": "bool", "E8M0": "e8m0",
          "float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def _weights_size(w) -> tuple[str, int]:
    """(type name, bytes) of an ``IConstantLayer.weights`` value: a numpy array for the types numpy
    has, a ``trt.Weights`` (element count, no usable nbytes) for INT4 / FP4 and the like."""
    if hasattr(w, "nbytes") and hasattr(w, "shape"):
        return _NAMES.get(w.dtype.name, w.dtype.name), int(w.nbytes)
    kind = str(w.dtype).split(".")[-1]
    return _NAMES.get(kind, kind.lower()), (int(w.size) * _BITS.get(kind, 8) + 7) // 8


def builder_weight_bytes(messages) -> int | None:
    """The last ``Total Weights Memory`` figure in the builder's log ([(severity, text)]), or None."""
    found = None
    for _sev, text in messages:
        m = _TOTAL_RE.search(text)
        if m:
            found = int(m.group(1))
    return found


def network_weight_bytes(backend, network) -> dict[str, int]:
    """Bytes of the network's constant layers per element type ("fp16", "int8", "int4", ...)."""
    trt = backend.module()
    out: dict[str, int] = {}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type != trt.LayerType.CONSTANT:
            continue
        layer.__class__ = trt.IConstantLayer
        key, nbytes = _weights_size(layer.weights)
        out[key] = out.get(key, 0) + nbytes
    return dict(sorted(out.items()))


def weights_summary(manifest) -> str:
    """One line for the build summary: weights in the plan and the types the network gave."""
    given = ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in manifest.network_weight_bytes.items() if v >= 1e5)
    given = f"; network constants {given}" if given else ""
    if manifest.weight_bytes is None:
        return f"not reported by the builder{given}"
    share = manifest.weight_bytes / manifest.engine_bytes if manifest.engine_bytes else 0.0
    return (f"{manifest.weight_bytes / 1e6:.1f} MB in the engine ({share:.0%} of the "
            f"{manifest.engine_bytes / 1e6:.1f} MB plan; the builder's Total Weights Memory){given}")


__all__ = ["builder_weight_bytes", "network_weight_bytes", "weights_summary"]
