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

import tempfile
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


def compare_layers(artifact, backend: str, ckpt, feed, tol, verbose: bool = False):
    """Torch vs the artifact at every marked point on one feed: a :class:`~.report.LayerwiseResult`
    naming the first layer that fails its tolerance."""
    import numpy as np
    from onnx import TensorProto
    from polygraphy.comparator import Comparator, SimpleCompareFunc

    from .compare import candidate_runner, quiet_polygraphy
    from .report import LayerPoint, LayerwiseResult, finite
    from .runners import TorchRunner

    if artifact.kind != "onnx":
        raise ValidationError(
            "--layerwise needs the ONNX export (it marks intermediate tensors as outputs); "
            "run it with --backend onnxruntime on the export folder"
        )
    elem = TensorProto.FLOAT16 if artifact.kv_dtype == np.float16 else TensorProto.FLOAT
    with tempfile.TemporaryDirectory(prefix="llama-trt-layerwise-") as tmp:
        marked = Path(tmp) / "model.layerwise.onnx"
        points = mark_layer_outputs(artifact.model_file, marked, ckpt.config.num_layers, elem)
        ref = TorchRunner(ckpt, past_dtype=artifact.kv_dtype, capture=torch_capture(points), name="torch-layerwise")
        cand = candidate_runner(artifact, backend, onnx_path=marked, name=f"{backend}-layerwise")
        names = [p.output_name for p in points]
        atol, rtol = tol.resolve(names)
        compare = SimpleCompareFunc(
            atol=atol, rtol=rtol, check_error_stat="elemwise",
            find_output_func=lambda name, index, result: [name] if name in names else None,
        )
        with quiet_polygraphy(verbose):
            with ref:  # count check: RMSNorm modules in torch == RMSNorm nodes in the graph
                n_torch = count_torch_norms(ref.model)
            if n_torch != 2 * ckpt.config.num_layers + 1:
                raise ValidationError(f"layerwise: torch model has {n_torch} RMSNorm modules, graph mapping needs "
                                      f"{2 * ckpt.config.num_layers + 1}")
            results = Comparator.run([ref, cand], data_loader=[feed.feed])
            accuracy = Comparator.compare_accuracy(results, compare_func=compare)[0]
    per_output = accuracy[(ref.name, cand.name)][0]
    rows = []
    for idx, p in enumerate(points):
        res = per_output[p.output_name]
        a, r = tol.for_output(p.output_name)
        rows.append(LayerPoint(
            index=idx, layer=p.layer, point=p.name, onnx_tensor=p.onnx_tensor, max_abs=finite(res.max_absdiff),
            mean_abs=finite(res.mean_absdiff), max_rel=finite(res.max_reldiff), atol=a, rtol=r, passed=bool(res),
        ))
    first = next((row for row in rows if not row.passed), None)
    return LayerwiseResult(
        feed=feed.name, points=tuple(rows),
        first_failing_layer=None if first is None else first.layer,
        first_failing_point=None if first is None else first.point,
    )
