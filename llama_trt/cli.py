"""The ``llama-trt`` command line: each command parses, calls one library function, prints.

Errors the user can act on (:class:`LlamaTrtError`) print as one line on stderr
with exit code 2 (usage / input problems); a failed validation exits 1.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from .errors import LlamaTrtError


def friendly_errors(fn):
    """Turn LlamaTrtError into one clear line and its exit code (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LlamaTrtError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="llama-trt")
def main() -> None:
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
@click.option("--seed", default=0, show_default=True, help="Seed of the random weights.")
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists.")
@friendly_errors
def create_tiny(out_dir: Path, seed: int, force: bool) -> None:
    """Write a small seeded LLaMA with GQA as a Hugging Face folder (no download needed)."""
    from .checkpoint import create_tiny_checkpoint

    path = create_tiny_checkpoint(out_dir, seed=seed, overwrite=force)
    click.echo(f"wrote {path}")


# Stage commands register here (one line each).


if __name__ == "__main__":  # pragma: no cover
    main()
