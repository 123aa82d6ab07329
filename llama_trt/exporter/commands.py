"""``llama-trt export``: parse, call :func:`llama_trt.exporter.export`, print a summary."""

from __future__ import annotations

from pathlib import Path

import click

from ..cli_support import EXPORT_DTYPES, QUANTIZE_SCHEMES, FiniteFloat, friendly_errors



@click.command("export")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("-o", "--out-dir", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Folder to create: model.onnx, manifest.json, tokenizer files.")
@click.option("--dtype", default="fp32", show_default=True, type=click.Choice(EXPORT_DTYPES),
              help="Weights/activations: fp32 or fp16 (int8: --quantize).")
@click.option("--opset", default=23, show_default=True, type=int, help="Default-domain ONNX opset.")
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it is an earlier llama-trt output.")
@click.option("--no-ort-check", is_flag=True, help="Skip the ONNX Runtime prefill/decode run after export.")
@click.option("--quantize", "quantize", default=None, type=click.Choice(QUANTIZE_SCHEMES),
              help="INT8 with explicit Q/DQ: int8-weight (W8A16, per-channel int8 weights) or "
                   "int8-sq (W8A8 SmoothQuant, calibrated). See exporter/quantize.py.")
@click.option("--quantize-embeddings/--no-quantize-embeddings", default=None,
              help="Quantize the token embedding table (default: no).")
@click.option("--quantize-lm-head/--no-quantize-lm-head", default=None,
              help="Quantize the lm head (default: yes for int8-weight, no for int8-sq).")
@click.option("--quantize-exclude", "quantize_exclude", multiple=True, metavar="PATTERN",
              help="Keep linear layers matching this glob in float (e.g. 'model.layers.0.*'). Repeatable.")
@click.option("--sq-alpha", type=FiniteFloat(0.0, 1.0), default=None, help="SmoothQuant migration strength in [0, 1] (default 0.5).")
@click.option("--calib-data", type=click.Path(path_type=Path), default=None,
              help="Calibration data for int8-sq: text (needs the checkpoint's tokenizer) or token ids "
                   "(.npy, or .txt of comma/space separated ints). Default: the model's own sampled text.")
@click.option("--calib-samples", type=click.IntRange(1), default=None, help="Calibration sequences (default 16, 64 tokens each).")
@friendly_errors
def export_cmd(checkpoint: Path, out_dir: Path, dtype: str, opset: int, force: bool, no_ort_check: bool,
               quantize, quantize_embeddings, quantize_lm_head, quantize_exclude, sq_alpha, calib_data,
               calib_samples) -> None:
    """Export CHECKPOINT to ONNX with llama_trt RMSNorm / RotaryEmbedding plugin nodes."""
    from . import export

    qkw = {}
    if quantize is not None:
        qkw = dict(quantize=quantize, quantize_embeddings=quantize_embeddings, quantize_lm_head=quantize_lm_head,
                   exclude=quantize_exclude, sq_alpha=sq_alpha, calib_data=calib_data, calib_samples=calib_samples)
    elif any(v not in (None, ()) for v in (quantize_embeddings, quantize_lm_head, sq_alpha, calib_data,
                                            calib_samples)) or quantize_exclude:
        from ..errors import ExportError

        raise ExportError("quantization options need --quantize int8-weight or --quantize int8-sq")
    m = export(checkpoint, out_dir, dtype=dtype, opset=opset, force=force, progress=True,
               ort_check=not no_ort_check, **qkw)
    ops = ", ".join(f"{p.domain}.{p.op_type} x{p.count}" for p in m.plugin_ops)
    extra = f" + {m.external_data}" if m.external_data else ""
    click.echo(f"wrote {out_dir / m.model_file}{extra} ({m.model_bytes / 2**20:.1f} MiB, {m.dtype}, opset {m.opset}; {ops})")
    q = getattr(m, "quantization", None)
    if q:
        click.echo(f"quantized ({q['scheme']}): {len(q['quantized'])} tensors int8, {len(q['excluded'])} excluded"
                   + (f"; calibration {q['calibration']['samples']} x {q['calibration']['seq_len']} tokens"
                      if q.get("calibration") else ""))
