"""What every CLI command shares: one-line errors with meaningful exit codes.

Lives apart from ``cli.py`` so the stage ``commands`` modules can import it while
``cli.py`` imports them.
"""

from __future__ import annotations

import functools
import sys

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
