"""``llama-trt build``: parse options, call :func:`llama_trt.trt_engines.build_engine`, print a summary."""

from __future__ import annotations

from pathlib import Path

import click

from ..cli_support import friendly_errors



@click.command("build")
@click.argument("artifact_dir", type=click.Path(path_type=Path))
@click.option("-o", "--out-dir", "engine_dir", required=True, type=click.Path(path_type=Path),
              help="Engine folder to create: model.plan, manifest.json, tokenizer files, build.log.")
@click.option("--max-batch", default=1, show_default=True, type=click.IntRange(1), help="Largest batch (both profiles).")
@click.option("--max-seq", default=None, type=click.IntRange(1),
              help="Longest prompt per prefill [default: min(512, max-context)].")
@click.option("--max-context", default=None, type=click.IntRange(1),
              help="Longest past + seq (KV cache) [default: the model's max_position_embeddings].")
@click.option("--target", "targets", multiple=True,
              help="Compute capability to build for ahead of time, e.g. 89 or 8.9 (repeat; TensorRT-RTX only).")
@click.option("--timing-cache", type=click.Path(path_type=Path), default=None,
              help="Timing cache file, read and updated (full TensorRT; a no-op on TensorRT-RTX 1.7).")
@click.option("--backend", type=click.Choice(["auto", "tensorrt", "tensorrt_rtx"]), default="auto", show_default=True,
              help="TensorRT flavour (auto: $LLAMA_TRT_BACKEND, else full TensorRT, else TensorRT-RTX).")
@click.option("--plugins/--no-plugins", default=None,
              help="Route the fused ops to the llama_trt TensorRT plugins [default: when available].")
@click.option("--rms-norm-native", is_flag=True, help="Lower RMSNorm to ONNX RMSNormalization, not the function body.")
@click.option("--opt-level", type=click.IntRange(0, 5), default=None, help="Builder optimization level 0..5.")
@click.option("--force", is_flag=True, help="Replace ENGINE_DIR if it is an earlier llama-trt output.")
@click.option("--half-weights/--no-half-weights", default=True, show_default=True,
              help="Quantized exports with fp32 activations: store scales and float matrices in fp16 and run the "
                   "GEMMs in fp16 (weight-only W8A16/W4A16), so the weights stay small in the engine.")
@click.option("--verbose", is_flag=True, help="Echo TensorRT warnings.")
@friendly_errors
def build_cmd(artifact_dir: Path, engine_dir: Path, max_batch: int, max_seq, max_context, targets, timing_cache,
              backend: str, plugins, rms_norm_native: bool, opt_level, force: bool, half_weights: bool,
              verbose: bool) -> None:
    """Build a TensorRT / TensorRT-RTX engine from the ONNX export in ARTIFACT_DIR."""
    from .builder import BuildOptions, build_engine
    from .weightstats import weights_summary

    options = BuildOptions(
        max_batch=max_batch, max_seq=max_seq, max_context=max_context, targets=tuple(targets),
        timing_cache=timing_cache, force=force, backend=None if backend == "auto" else backend, plugins=plugins,
        rms_norm_native=rms_norm_native, optimization_level=opt_level, progress=True, verbose=verbose,
        half_weights=half_weights,
    )
    m = build_engine(artifact_dir, engine_dir, options)
    targets_txt = ", ".join(f"sm_{t}" for t in m.targets) or "backend default"
    routes = ", ".join(f"{r.op.split('.')[-1]} -> {r.route}" for r in m.op_routing) or "no fused ops"
    click.echo(f"wrote {engine_dir / m.engine_file} ({m.engine_bytes / 2**20:.1f} MiB, {m.precision}, "
               f"{m.backend} {m.backend_version}, targets {targets_txt}; {routes}; {m.build_seconds:.1f}s)")
    click.echo(f"weights: {weights_summary(m)}")
    if m.timing_cache.get("path") and not m.timing_cache.get("used"):
        click.echo(f"note: {m.timing_cache['note']}")
