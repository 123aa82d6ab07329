"""Layer-wise debugging: compare intermediate tensors to find the first layer that goes wrong.

Marking graph tensors as outputs does not reach inside ONNX local functions, so we mark
what exists at the top level: the input and the output of every ``llama_trt.RMSNorm``
node. In a LLaMA decoder those are exactly the residual stream and its normalised copies:

    RMSNorm #2i     in  = residual stream entering layer i (embedding for i = 0)
                    out = input_layernorm(x) of layer i (what attention sees)
    RMSNorm #2i+1   in  = x + attention(...) (layer i's attention residual add)
                    out = post_attention_layernorm(x) of layer i (what the MLP sees)
    RMSNorm #2L     in  = output of the last layer (its MLP residual add)
                    out = final norm

The mapping is derived from node order, never from tensor names: the k-th RMSNorm node of
the graph is paired with the k-th RMSNorm module call of the torch model (forward hooks),
and the counts must agree. Each marked tensor gets a readable name through an ``Identity``
node (``layerwise.layers.1.output``...), so reports and ``--tol layerwise.*=...`` can use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import ValidationError
from ..plugins import DOMAIN


@dataclass(frozen=True)
class Point:
    name: str          # readable name ("layers.1.output")
    layer: int         # -1 embedding, L final norm
    onnx_tensor: str   # the tensor it copies
    norm_call: int     # index of the RMSNorm call / node
    which: str         # "in" | "out"

    @property
    def output_name(self) -> str:
        """Name of the marked graph output (prefixed: never collides with graph tensors)."""
        return OUTPUT_PREFIX + self.name


OUTPUT_PREFIX = "layerwise."


def points_for(num_layers: int, norm_io: list[tuple[str, str]]) -> list[Point]:
    """Readable points in graph order from the (input, output) tensor of each RMSNorm node."""
    expected = 2 * num_layers + 1
    if len(norm_io) != expected:
        raise ValidationError(
            f"layerwise: the graph has {len(norm_io)} top-level {DOMAIN}.RMSNorm nodes, the model "
            f"makes {expected} RMSNorm calls ({num_layers} layers x 2 + final norm); cannot map them"
        )
    pts: list[Point] = []
    for k, (x, y) in enumerate(norm_io):
        i, second = divmod(k, 2)
        if k == expected - 1:
            pts.append(Point("embedding" if num_layers == 0 else f"layers.{num_layers - 1}.output", num_layers - 1, x, k, "in"))
            pts.append(Point("norm", num_layers, y, k, "out"))
        elif second == 0:
            pts.append(Point("embedding" if i == 0 else f"layers.{i - 1}.output", i - 1, x, k, "in"))
            pts.append(Point(f"layers.{i}.input_layernorm", i, y, k, "out"))
        else:
            pts.append(Point(f"layers.{i}.attn_residual", i, x, k, "in"))
            pts.append(Point(f"layers.{i}.post_attention_layernorm", i, y, k, "out"))
    return pts


def rms_norm_io(model) -> list[tuple[str, str]]:
    return [
        (n.input[0], n.output[0])
        for n in model.graph.node
        if n.domain == DOMAIN and n.op_type == "RMSNorm"
    ]


def mark_layer_outputs(onnx_path, out_path, num_layers: int, elem_type: int) -> list[Point]:
    """Copy of the model with every layer point added as a graph output (via Identity)."""
    import onnx
    from onnx import helper

    model = onnx.load(str(onnx_path))
    pts = points_for(num_layers, rms_norm_io(model))
    taken = {t for n in model.graph.node for t in (*n.input, *n.output)} | {i.name for i in model.graph.input}
    for p in pts:
        if p.output_name in taken:
            raise ValidationError(f"layerwise: the graph already has a tensor named {p.output_name!r}")
        model.graph.node.append(helper.make_node("Identity", [p.onnx_tensor], [p.output_name], name=p.output_name))
        model.graph.output.append(helper.make_tensor_value_info(p.output_name, elem_type, None))
    out_path = Path(out_path)
    size = model.ByteSize()
    if size > 1_900_000_000:
        onnx.save(model, str(out_path), save_as_external_data=True, location=out_path.name + ".data")
    else:
        onnx.save(model, str(out_path))
    return pts


def torch_capture(points: list[Point]) -> list[tuple[str, int, str]]:
    """What :class:`~.runners.TorchRunner` must capture: (name, RMSNorm call index, in/out)."""
    return [(p.output_name, p.norm_call, p.which) for p in points]


def count_torch_norms(model) -> int:
    from ..model.llama import RMSNorm

    return sum(isinstance(m, RMSNorm) for m in model.modules())
