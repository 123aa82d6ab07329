"""What every CLI command shares: one-line errors with meaningful exit codes, option types
that refuse out-of-range values, and the choices every command offers the same way.

Lives apart from ``cli.py`` so the stage ``commands`` modules can import it while
``cli.py`` imports them.

Error contract (README): a problem the user can fix prints ONE ``error: ...`` line naming
the problem and the fix and exits 2 (our :class:`LlamaTrtError`, click usage errors, files
that cannot be read or written: disk full, permissions, corrupt model files). A bug of ours
prints one line too and exits 1; ``llama-trt --debug CMD`` shows its traceback.
"""

from __future__ import annotations

import errno
import functools
import math
import signal
import sys
from pathlib import Path

import click

from . import termination
from .errors import LlamaTrtError
from .termination import Terminated

BACKENDS = ("auto", "tensorrt", "onnxruntime", "torch")
BACKEND_HELP = "auto (engine -> tensorrt, export -> onnxruntime, checkpoint -> torch), tensorrt, onnxruntime, torch"
EXPORT_DTYPES = ("fp32", "fp16")
QUANTIZE_SCHEMES = ("int8-weight", "int8-sq", "int4-awq", "int4-rtn")  # = quantize.schemes.SCHEME_NAMES
GROUP_SIZES = ("32", "64", "128")
INT8_KERNEL_BLOCKS = ("auto", "32", "64", "128")  # = "auto" + quantize.schemes.INT8_KERNEL_BLOCKS
HEAD_SCAN_BITS = ("auto", "4", "8")  # = "auto" + quantize.schemes.HEAD_SCAN_BITS


def backend_option(help: str = BACKEND_HELP):
    return click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True, help=help)


def tokenizer_options(fn):
    """``--tokenizer DIR`` and ``--chat-template FILE``, the same on run, chat and serve."""
    fn = click.option("--chat-template", type=click.Path(path_type=Path, dir_okay=False), default=None,
                      help="Jinja chat template to use instead of the tokenizer's (chat_template.jinja, "
                           "tokenizer_config.json or GGUF metadata).")(fn)
    return click.option("--tokenizer", type=click.Path(path_type=Path), default=None,
                        help="Tokenizer folder (tokenizer.json or tokenizer.model + tokenizer_config.json, "
                             "generation_config.json, chat_template.jinja) or file; default: the artifact's.")(fn)


class FiniteFloat(click.FloatRange):
    """A float in a range that is also finite: ``nan`` and ``inf`` are refused (click's
    FloatRange lets nan through, as every comparison with nan is false)."""

    name = "finite float"

    def convert(self, value, param, ctx):
        value = super().convert(value, param, ctx)
        if not math.isfinite(value):
            self.fail(f"{value} is not a finite number.", param, ctx)
        return value


# ---------------------------------------------------------------------------------------
def _debug() -> bool:
    ctx = click.get_current_context(silent=True)
    return bool(ctx and ctx.find_root().params.get("debug"))


def _os_error_line(e: OSError) -> str:
    where = f" ({e.filename})" if e.filename else ""
    if e.errno == errno.ENOSPC:
        return f"the disk is full{where}: free some space or write to another folder"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"permission denied{where}: choose a folder you can write to"
    return f"{e.strerror or e}{where}"


def _corrupt_file_line(e: Exception) -> str | None:
    """A model file that onnx / ONNX Runtime / protobuf cannot parse: the user's file, not our bug."""
    module = type(e).__module__ or ""
    if module.startswith(("onnxruntime", "google.protobuf", "onnx")):
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return (f"cannot load the model: {first[:300]}; the file is corrupt or not what the manifest says: "
                "re-export (or rebuild) the artifact")
    return None


def friendly_errors(fn):
    """Turn every failure into one clear line and its exit code (a traceback only with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LlamaTrtError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            sys.exit(130)
        except Exception as e:  # noqa: BLE001 - the last line between a user and a traceback
            if _debug():
                raise
            if isinstance(e, OSError):
                click.echo(f"error: {_os_error_line(e)}", err=True)
                sys.exit(2)
            line = _corrupt_file_line(e)
            if line is not None:
                click.echo(f"error: {line}", err=True)
                sys.exit(2)
            click.echo(f"error: unexpected {type(e).__name__}: {e} (a bug in llama-trt: rerun with "
                       "`llama-trt --debug ...` for the traceback and report it)", err=True)
            sys.exit(1)

    return wrapper


class Cli(click.Group):
    """The top-level group: click's usage errors in our one-line style (exit 2), and SIGTERM
    turned into an exception so an interrupted export or build removes its temporary folder."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        installed = termination.install()
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            termination.raise_if_terminated()
        except click.UsageError as e:
            hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
            click.echo(f"error: {e.format_message()}{hint}", err=True)
            sys.exit(2)
        except click.ClickException as e:
            click.echo(f"error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("error: aborted", err=True)
            sys.exit(1)
        except Terminated as e:
            click.echo("error: terminated (SIGTERM)", err=True)
            sys.exit(e.code)
        finally:
            if installed is not None and installed[1] is not None:
                signal.signal(signal.SIGTERM, installed[1])
        sys.exit(code if isinstance(code, int) else 0)


__all__ = ["BACKENDS", "BACKEND_HELP", "Cli", "EXPORT_DTYPES", "FiniteFloat", "HEAD_SCAN_BITS", "INT8_KERNEL_BLOCKS", "QUANTIZE_SCHEMES",
           "backend_option", "friendly_errors"]
