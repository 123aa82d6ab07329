"""torch LLaMA -> ONNX with ``llama_trt`` plugin nodes backed by ONNX functions.

Steps: load the checkpoint, build the torch model in the export dtype, trace it with
``torch.export`` and convert with the dynamo ONNX exporter (``custom_translation_table``
turns the ``llama_trt`` torch custom ops into ``llama_trt`` nodes), add each plugin's
FunctionProto to ``model.functions``, write into a temporary folder beside OUT_DIR,
check (``onnx.checker`` full check + an ONNX Runtime prefill/decode run), then move
the folder into place. A failure leaves OUT_DIR untouched.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
import platform
import shutil
import warnings
from pathlib import Path

from ..config import Precision
from ..errors import ExportError, LlamaTrtError
from ..outputs import move_into_place, prepare_output
from .manifest import (
    EXTERNAL_DATA_NAME, MANIFEST_NAME, MODEL_NAME, ExportManifest, PluginOpUse, TensorSpec,
)

STEPS = ("load", "trace/export", "add plugin functions", "check", "save")
# Protobuf cannot hold 2 GB: weights go to external data above this (margin for the graph).
EXTERNAL_DATA_THRESHOLD = 2**31 - 1 - (64 << 20)
MIN_OPSET = 18
# Example sizes for tracing: >= 2 everywhere so torch.export does not specialise 0/1.
EXAMPLE_BATCH, EXAMPLE_SEQ, EXAMPLE_PAST = 2, 3, 4
TOTAL_SEQ = "total_seq"


# ---------------------------------------------------------------------------------------
# progress display
class _Steps:
    """Named steps on a rich progress display (or silent)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._progress = None
        self._task = None

    def __enter__(self):
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                SpinnerColumn(), TextColumn("[bold]export[/bold] {task.description}"), BarColumn(),
                MofNCompleteColumn(), TimeElapsedColumn(), console=Console(stderr=True), transient=False,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task(STEPS[0], total=len(STEPS))
        return self

    @contextlib.contextmanager
    def step(self, name: str):
        assert name in STEPS, name
        if self._progress is not None:
            self._progress.update(self._task, description=name)
        yield
        if self._progress is not None:
            self._progress.advance(self._task)

    def __exit__(self, *exc):
        if self._progress is not None:
            if exc[0] is None:
                self._progress.update(self._task, description="done")
            else:  # leave only the error message on screen
                self._progress.update(self._task, visible=False)
            self._progress.__exit__(*exc)
        return False


# ---------------------------------------------------------------------------------------
# output folder handling
def _prepare_out_dir(out_dir: Path, force: bool, inputs=()) -> Path:
    """Check OUT_DIR can be (re)placed (see :mod:`llama_trt.outputs`); returns a fresh temporary folder beside it."""
    return prepare_output(out_dir, force=force, inputs=inputs, option="-o", error=ExportError, tag="export")


_move_into_place = move_into_place


# ---------------------------------------------------------------------------------------
# names
def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    from .feeds import past_names, present_names

    return (
        ["input_ids", "attention_mask", "position_ids", *past_names(num_layers)],
        ["logits", *present_names(num_layers)],
    )


def tool_versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("llama-trt", "torch", "onnx", "onnxscript", "onnx-ir", "onnxruntime", "transformers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    if "llama-trt" not in out:
        from .. import __version__

        out["llama-trt"] = __version__
    return out


# ---------------------------------------------------------------------------------------
# torch side
def _flat_io_module(model):
    """nn.Module with forward(input_ids, attention_mask, position_ids, *past) -> (logits, *presents).

    It holds the model's own submodules under the same attribute names, so the ONNX
    initializers keep the Hugging Face parameter names (model.layers.0...., lm_head.weight).
    """
    import torch

    from ..model import LlamaForCausalLM

    class FlatLlama(torch.nn.Module):
        def __init__(self, inner: LlamaForCausalLM) -> None:
            super().__init__()
            self.config = inner.config
            self.model = inner.model
            self.lm_head = inner.lm_head

        @property
        def dtype(self):
            return self.lm_head.weight.dtype

        def forward(self, input_ids, attention_mask, position_ids, *past):
            pkv = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
            logits, presents = LlamaForCausalLM.forward(self, input_ids, attention_mask, position_ids, pkv)
            return (logits, *[t for kv in presents for t in kv])

    return FlatLlama(model).eval()


def _example_inputs(config, dtype):
    import torch

    g = torch.Generator().manual_seed(0)
    b, s, p = EXAMPLE_BATCH, EXAMPLE_SEQ, EXAMPLE_PAST
    ids = torch.randint(0, config.vocab_size, (b, s), generator=g)
    mask = torch.ones(b, p + s, dtype=torch.int64)
    pos = torch.arange(p, p + s).expand(b, s).contiguous()
    past = [torch.zeros(b, config.num_kv_heads, p, config.head_dim, dtype=dtype) for _ in range(2 * config.num_layers)]
    return (ids, mask, pos, *past)


def _dynamic_shapes(num_layers: int):
    import torch

    Dim = torch.export.Dim
    batch, seq, past = Dim("batch", min=1), Dim("seq", min=1), Dim("past", min=0)
    return {
        "input_ids": {0: batch, 1: seq},
        # total_seq = past + seq cannot be a derived Dim of two symbols; left free here,
        # torch.export ties it to past + seq through the attention broadcast.
        "attention_mask": {0: batch, 1: Dim.DYNAMIC},
        "position_ids": {0: batch, 1: seq},
        "past": tuple({0: batch, 2: past} for _ in range(2 * num_layers)),
    }


def _translation_table():
    from ..plugins import all_specs
    from ..plugins.onnx_support import onnx_parts, register_all_schemas

    register_all_schemas()
    return {onnx_parts(s).torch_op(): onnx_parts(s).translation for s in all_specs()}


@contextlib.contextmanager
def _quiet_torch_export():
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
                yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


def trace_to_onnx(model, opset: int):
    """Export the (already cast) torch model; returns an ``onnx_ir.Model``."""
    import torch

    config = model.config
    inputs, outputs = io_names(config.num_layers)
    wrapper = _flat_io_module(model)
    args = _example_inputs(config, model.dtype)
    table = _translation_table()
    try:
        with torch.no_grad(), _quiet_torch_export():
            program = torch.onnx.export(
                wrapper, args, dynamo=True, custom_translation_table=table,
                dynamic_shapes=_dynamic_shapes(config.num_layers), opset_version=opset,
                input_names=inputs, output_names=outputs, verbose=False, report=False,
                optimize=True,
            )
    except Exception as e:  # torch raises many types; summarise in one line
        raise ExportError(f"torch.onnx export failed: {_error_summary(e)}") from e
    return program.model


def _error_summary(e: BaseException) -> str:
    """The informative line of a torch.onnx error (its "Exception summary"), shortened."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if ln.startswith("## Exception summary") and i + 1 < len(lines):
            return lines[i + 1][:400]
    return (lines[0] if lines else type(e).__name__)[:400]


# ---------------------------------------------------------------------------------------
# ONNX side
def _dtype_name(ir_dtype) -> str:
    import numpy as np

    return np.dtype(ir_dtype.numpy()).name


def finish_graph(ir_model, config, opset: int) -> tuple[list[PluginOpUse], list[TensorSpec], list[TensorSpec]]:
    """Name the dynamic dims, add the plugin functions; return plugin use and IO specs."""
    import onnx_ir as ir

    from ..plugins import all_specs
    from ..plugins.onnx_support import onnx_parts

    graph = ir_model.graph
    # The attention mask and the presents span past + seq: call that dim total_seq.
    mask = next(v for v in graph.inputs if v.name == "attention_mask")
    renames = {str(mask.shape[1]): TOTAL_SEQ}
    present = next(v for v in graph.outputs if v.name.startswith("present."))
    renames[str(present.shape[2])] = TOTAL_SEQ

    def rename(value):
        if value.shape is None:
            return
        dims = [ir.SymbolicDim(renames.get(str(d), str(d))) if isinstance(d, ir.SymbolicDim) else d for d in value.shape]
        value.shape = ir.Shape(dims)

    for v in (*graph.inputs, *graph.outputs):
        rename(v)

    uses = []
    for spec in all_specs():
        count = sum(1 for n in ir.traversal.RecursiveGraphIterator(graph) if n.domain == spec.domain and n.op_type == spec.op_type)
        if count == 0:
            continue
        fn = ir.serde.deserialize_function(onnx_parts(spec).function_proto(opset))
        ir_model.functions[fn.identifier()] = fn
        uses.append(PluginOpUse(spec.domain, spec.op_type, spec.version, dict(spec.attributes), count))
    ir_model.opset_imports.setdefault("llama_trt", 1)

    def specs(values):
        return [
            TensorSpec(v.name, _dtype_name(v.dtype), tuple(str(d) if isinstance(d, ir.SymbolicDim) else int(d) for d in v.shape))
            for v in values
        ]

    return uses, specs(graph.inputs), specs(graph.outputs)


def _initializer_bytes(ir_model) -> int:
    return sum(v.const_value.nbytes for v in ir_model.graph.initializers.values() if v.const_value is not None)


def save_onnx(ir_model, folder: Path) -> str | None:
    """Write model.onnx (weights > 2 GB as external data beside it); returns the data file name."""
    import onnx_ir as ir

    external = _initializer_bytes(ir_model) > EXTERNAL_DATA_THRESHOLD
    ir.save(ir_model, folder / MODEL_NAME, external_data=EXTERNAL_DATA_NAME if external else None)
    return EXTERNAL_DATA_NAME if external else None


def check_exported(folder: Path, manifest: ExportManifest, ort_smoke: bool = True) -> None:
    """onnx.checker full check from the file; then ONNX Runtime prefill (past = 0) + one decode."""
    import numpy as np
    import onnx

    path = folder / manifest.model_file
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:
        raise ExportError(f"exported graph fails onnx.checker: {str(e).splitlines()[0][:400]}") from e
    if not ort_smoke:
        return
    from .feeds import build_feeds, ort_session, split_outputs

    cfg = manifest.config
    try:
        sess = ort_session(path)
        ids = np.array([[cfg["bos_token_id"] or 0, 3 % cfg["vocab_size"]]] * 2, dtype=np.int64)
        logits, presents = split_outputs(manifest, sess.run(None, build_feeds(manifest, ids)))
        nxt = logits[:, -1:].argmax(-1)
        logits2, presents2 = split_outputs(
            manifest, sess.run(None, build_feeds(manifest, nxt, np.ones((2, 3), np.int64), past=presents))
        )
    except LlamaTrtError:
        raise
    except Exception as e:
        raise ExportError(f"ONNX Runtime cannot run the exported model: {str(e).splitlines()[0][:400]}") from e
    kv = (2, cfg["num_kv_heads"], 3, cfg["head_dim"])
    problems = []
    if logits.shape != (2, 2, cfg["vocab_size"]) or logits2.shape != (2, 1, cfg["vocab_size"]):
        problems.append(f"logits shapes {logits.shape}, {logits2.shape}")
    if presents2[0].shape != kv:
        problems.append(f"present shape {presents2[0].shape}, expected {kv}")
    if not (np.isfinite(logits).all() and np.isfinite(logits2).all()):
        problems.append("non-finite logits")
    if problems:
        raise ExportError("exported model gives wrong results in ONNX Runtime: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------
def export(
    checkpoint,
    out_dir,
    dtype: str = "fp32",
    opset: int = 23,
    force: bool = False,
    *,
    progress: bool = False,
    ort_check: bool = True,
) -> ExportManifest:
    """Export ``checkpoint`` to ``out_dir/model.onnx`` + ``manifest.json`` (+ tokenizer files).

    ``dtype``: "fp32" or "fp16" (weights and activations; RMSNorm statistics, softmax,
    RoPE angles and logits stay float32). ``progress`` shows a rich step display on
    stderr. ``ort_check`` runs the written file once in ONNX Runtime (prefill with an
    empty past, then one decode step) before it is moved into place.
    """
    import onnx

    try:
        precision = Precision.parse(dtype)
    except LlamaTrtError:
        precision = None
    if precision not in (Precision.FP32, Precision.FP16):
        raise ExportError(
            f"unsupported export dtype {dtype!r}: choose fp32 or fp16 (int8: `llama-trt export --quantize int8-weight` or `--quantize int8-sq`)"
        )
    max_opset = onnx.defs.onnx_opset_version()
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= max_opset:
        raise ExportError(f"unsupported opset {opset!r}: choose {MIN_OPSET}..{max_opset} (default 23)")
    from ..checkpoint import detect_format
    from ..checkpoint.hub import resolve_checkpoint

    checkpoint = resolve_checkpoint(checkpoint)  # a Hugging Face id -> its cached snapshot
    out_dir = Path(out_dir).absolute()

    detect_format(checkpoint)  # fail fast on a missing / unrecognised checkpoint
    tmp = _prepare_out_dir(out_dir, force, inputs=(checkpoint,))
    try:
        with _Steps(progress) as steps:
            with steps.step("load"):
                from ..checkpoint import build_model, load_checkpoint

                ckpt = load_checkpoint(checkpoint)
                model = build_model(ckpt, precision.value)
                config = ckpt.config
                source_sha256 = ckpt.fingerprint()  # hashed once: 0.5 GB for SmolLM2
            with steps.step("trace/export"):
                ir_model = trace_to_onnx(model, opset)
                del model
            with steps.step("add plugin functions"):
                uses, inputs, outputs = finish_graph(ir_model, config, opset)
                ir_model.producer_name = "llama-trt"
                ir_model.metadata_props.update(
                    {"llama_trt.dtype": precision.value, "llama_trt.source_sha256": source_sha256}
                )
            with steps.step("check"):
                external = save_onnx(ir_model, tmp)
                del ir_model
                size = sum(f.stat().st_size for f in tmp.iterdir() if f.is_file())
                manifest = ExportManifest(
                    source_checkpoint=str(checkpoint.resolve()),
                    source_format=ckpt.format,
                    source_sha256=source_sha256,
                    config=config.to_dict(),
                    dtype=precision.value,
                    opset=opset,
                    plugin_ops=tuple(uses),
                    inputs=tuple(inputs),
                    outputs=tuple(outputs),
                    tool_versions=tool_versions(),
                    external_data=external,
                    tokenizer_files=tuple(f.name for f in ckpt.tokenizer_files),
                    model_bytes=size,
                    created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                )
                check_exported(tmp, manifest, ort_smoke=ort_check)
            with steps.step("save"):
                for f in ckpt.tokenizer_files:
                    shutil.copy2(f, tmp / f.name)
                (tmp / MANIFEST_NAME).write_text(manifest.to_json())
                _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
