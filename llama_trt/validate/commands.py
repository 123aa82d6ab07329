"""``llama-trt validate``: parse, call :func:`validate`, print; the verdict is the exit code.

Exit 0: passed. Exit 1: a comparison failed (the failing outputs / metrics are named).
Exit 2: usage problems (missing artifact, checkpoint/artifact mismatch, backend missing).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..cli_support import friendly_errors



def run_results_path_for(report_path: Path) -> Path:
    """Polygraphy's RunResults go beside the report: ``report.json`` -> ``report.run_results.json``."""
    return report_path.with_name(report_path.stem + ".run_results.json")


@click.command("validate")
@click.argument("artifact_dir", type=click.Path(path_type=Path))
@click.option("--checkpoint", "-c", required=True, type=click.Path(path_type=Path),
              help="The checkpoint the artifact was made from (the fp32 torch reference).")
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime", show_default=True,
              help="Run the ONNX export with ONNX Runtime, or a TensorRT engine folder with TensorRT.")
@click.option("--report", "report_path", type=click.Path(path_type=Path),
              help="Write the JSON report here (Polygraphy RunResults go beside it).")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), help="Write an error plot (PNG) here.")
@click.option("--steps", default=32, show_default=True, type=click.IntRange(1), help="Greedy generation steps.")
@click.option("--tol", "tols", multiple=True, metavar="NAME=ATOL[:RTOL] | METRIC=VALUE",
              help="Override a tolerance: output name or glob (logits=1e-3:1e-3, 'present.*=1e-2', default=...) "
                   "or a certificate gate (kl, kl_p99, top1, ppl_ratio, cosine). Repeatable.")
@click.option("--eval-text", type=click.Path(path_type=Path),
              help="UTF-8 text for the teacher-forced certificate (default: the built-in ~2,700-token corpus).")
@click.option("--window", type=click.IntRange(16), default=None,
              help="Teacher-forcing window in tokens (default 512, capped by the context).")
@click.option("--layerwise", is_flag=True, help="Also compare every layer's residual stream / norms; report the first bad layer.")
@click.option("--verbose", is_flag=True, help="Show Polygraphy's own log.")
@friendly_errors
def validate_cmd(artifact_dir, checkpoint, backend, report_path, plot_path, steps, tols, eval_text, window, layerwise,
                 verbose):
    """Compare ARTIFACT_DIR against the checkpoint's fp32 torch model with Polygraphy.

    Elementwise per-output tolerances, then an accuracy certificate: teacher-forced mean KL,
    KL p99, same-top-1 and perplexity ratio over real text, gated per precision / scheme and
    written into the export's manifest.json (`run` and `serve` show it). Greedy agreement is
    reported, not gated. Exits 0 only if it passes.
    """
    from .core import validate
    from .render import plot_report, render_report
    from .tolerances import parse_tols

    overrides = parse_tols(tols)
    rr_path = run_results_path_for(report_path) if report_path else None
    if rr_path is not None:
        rr_path.parent.mkdir(parents=True, exist_ok=True)
    report = validate(artifact_dir, checkpoint, backend=backend, steps=steps, tolerances=overrides,
                      layerwise=layerwise, run_results_path=rr_path, verbose=verbose, progress=True,
                      eval_text=eval_text, window=window)
    render_report(report)
    if report.certificate is not None:
        where = " (written to manifest.json)" if report.artifact_kind == "onnx" else ""
        click.echo(f"certificate: {report.certificate.summary()}{where}")
    if report_path:
        report.save(report_path)
        click.echo(f"report: {report_path} (Polygraphy run results: {rr_path})")
    if plot_path:
        plot_report(report, plot_path)
        click.echo(f"plot: {plot_path}")
    if not report.passed:
        click.echo("validation FAILED:", err=True)
        for f in report.failures:
            click.echo(f"  - {f}", err=True)
        if report.layerwise is not None and report.layerwise.first_failing_layer is not None:
            click.echo(f"  first failing layer: {report.layerwise.first_failing_layer} "
                       f"({report.layerwise.first_failing_point})", err=True)
        sys.exit(1)
    click.echo("validation passed")
