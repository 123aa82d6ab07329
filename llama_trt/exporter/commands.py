"""``llama-trt export``: parse, call :func:`llama_trt.exporter.export`, print a summary."""

from __future__ import annotations

from pathlib import Path

import click

from ..cli_support import EXPORT_DTYPES, GROUP_SIZES, HEAD_SCAN_BITS, INT8_KERNEL_BLOCKS, QUANTIZE_SCHEMES, FiniteFloat, friendly_errors



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
              help="Explicit Q/DQ: int8-weight (W8A16, per-channel int8), int8-sq (W8A8 SmoothQuant; refused "
                   "when it misses its KL target), int4-awq (W4A16, AWQ on calibration text), int4-rtn "
                   "(W4A16 round-to-nearest). See llama_trt/quantize.")
@click.option("--group-size", type=click.Choice(GROUP_SIZES), default=None,
              help="int4 block size along the input dimension (default 64); a matrix it does not divide stays int8.")
@click.option("--int4-zero-point", is_flag=True, default=False,
              help="int4 with uint4 zero points (asymmetric). ONNX Runtime only: TensorRT rejects INT4 zero points.")
@click.option("--quantize-embeddings/--no-quantize-embeddings", default=None,
              help="Quantize the token embedding table (default: no).")
@click.option("--quantize-lm-head/--no-quantize-lm-head", default=None,
              help="Quantize the lm head at the scheme's bits (default: int8 in blocks of 32 for int8-weight and "
                   "int4 schemes, float for int8-sq; a tied head shares one stored copy with the embedding either way).")
@click.option("--quantize-exclude", "quantize_exclude", multiple=True, metavar="PATTERN",
              help="Keep linear layers matching this glob in float (e.g. 'model.layers.0.*'). Repeatable.")
@click.option("--sq-alpha", type=FiniteFloat(0.0, 1.0), default=None, help="SmoothQuant migration strength in [0, 1] (default 0.5).")
@click.option("--sq-target-kl", type=FiniteFloat(0.0, 10.0, min_open=True), default=None,
              help="int8-sq: highest KL vs fp32 accepted before refusing (default: the int8-sq gate, 0.02).")
@click.option("--no-certify", is_flag=True, help="Skip the accuracy certificate after a quantized export.")
@click.option("--int8-kernel-block", type=click.Choice(INT8_KERNEL_BLOCKS), default=None,
              help="int8-weight on ONNX Runtime: the block its int8 kernel rounds activations in (wider: faster, "
                   "coarser). auto (default): 64 when that passes the certificate, else 32.")
@click.option("--head-scan-bits", type=click.Choice(HEAD_SCAN_BITS), default=None,
              help="int4 schemes on ONNX Runtime: find the int8 lm head's best logits with an int4 copy of it (4: "
                   "faster) or the int8 head itself (8); either way they are rescored from the int8 weights. "
                   "auto (default): 4 when that passes the certificate, else 8.")
@click.option("--calib-data", type=click.Path(path_type=Path), default=None,
              help="Calibration data for int8-sq / int4-awq / int8-weight's AWQ scaling: text (needs the checkpoint's tokenizer) or token ids "
                   "(.npy, or .txt of comma/space separated ints). Default: the model's own sampled text.")
@click.option("--calib-samples", type=click.IntRange(1), default=None, help="Calibration sequences of 64 tokens (default 16; 128 for int8-weight, whose GPTQ rounding needs them).")
@friendly_errors
def export_cmd(checkpoint: Path, out_dir: Path, dtype: str, opset: int, force: bool, no_ort_check: bool,
               quantize, group_size, int4_zero_point, quantize_embeddings, quantize_lm_head, quantize_exclude,
               sq_alpha, sq_target_kl, no_certify, int8_kernel_block, head_scan_bits, calib_data, calib_samples) -> None:
    """Export CHECKPOINT to ONNX with llama_trt RMSNorm / RotaryEmbedding plugin nodes."""
    from . import export

    qkw = {}
    if quantize is not None:
        qkw = dict(quantize=quantize, quantize_embeddings=quantize_embeddings, quantize_lm_head=quantize_lm_head,
                   exclude=quantize_exclude, sq_alpha=sq_alpha, calib_data=calib_data, calib_samples=calib_samples,
                   group_size=None if group_size is None else int(group_size), int4_zero_point=int4_zero_point,
                   sq_target_kl=sq_target_kl, certify=not no_certify, int8_kernel_block=int8_kernel_block,
                   head_scan_bits=head_scan_bits)
    elif any(v not in (None, ()) for v in (quantize_embeddings, quantize_lm_head, sq_alpha, calib_data,
                                            calib_samples, group_size, sq_target_kl, int8_kernel_block,
                                            head_scan_bits)) \
            or quantize_exclude or int4_zero_point or no_certify:
        from ..errors import ExportError

        raise ExportError("quantization options need --quantize (int8-weight, int8-sq, int4-awq or int4-rtn)")
    m = export(checkpoint, out_dir, dtype=dtype, opset=opset, force=force, progress=True,
               ort_check=not no_ort_check, **qkw)
    ops = ", ".join(f"{p.domain}.{p.op_type} x{p.count}" for p in m.plugin_ops)
    extra = f" + {m.external_data}" if m.external_data else ""
    click.echo(f"wrote {out_dir / m.model_file}{extra} ({m.model_bytes / 2**20:.1f} MiB, {m.dtype}, opset {m.opset}; {ops})")
    q = getattr(m, "quantization", None)
    if q:
        _print_quantization(q, m.certificate)


def _print_quantization(q: dict, certificate: dict | None) -> None:
    from ..quantize.kernel_form import describe as describe_kernel_form
    from ..validate.certificate import certificate_from_manifest

    group = f" g{q['group_size']}" if q.get("group_size") else ""
    sizes = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in q.get("weight_bytes", {}).items() if v >= 2**16)
    click.echo(f"quantized ({q['scheme']}{group}): {len(q['quantized'])} layers, {len(q['excluded'])} kept float; "
               f"weights {sizes}" + (f"; calibration {q['calibration']['samples']} x {q['calibration']['seq_len']} "
                                     f"tokens" if q.get("calibration") else ""))
    if q.get("int8_fallback"):
        click.echo(f"  {len(q['int8_fallback'])} layers int8 (group does not divide K): "
                   + ", ".join(e["name"] for e in q["int8_fallback"][:4]) + (" ..." if len(q["int8_fallback"]) > 4 else ""))
    if q.get("w8a16_fallback"):
        click.echo(f"  kept W8A16 by measured damage ({len(q['w8a16_fallback'])}): "
                   + ", ".join(q["w8a16_fallback"]))
    if q.get("spec", {}).get("tensorrt_note"):
        click.echo(f"  note: not buildable by TensorRT: {q['spec']['tensorrt_note']}")
    kernel = describe_kernel_form(q.get("ort_kernel"))
    if kernel:
        click.echo(f"  {kernel}")
    cert = certificate_from_manifest({"certificate": certificate})
    if cert is not None:
        click.echo(f"certificate: {cert.summary()}")
        if not cert.passed:
            click.echo(f"warning: the {q['scheme']} export misses its accuracy gate: " + "; ".join(cert.failures),
                       err=True)
