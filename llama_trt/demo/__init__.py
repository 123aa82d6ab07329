"""``llama-trt demo``: the whole pipeline in one command.

* ``--size smollm2`` (default): SmolLM2-135M-Instruct, a real trained chat model (:mod:`.real`).
* ``--size tiny|small``: a seeded random LLaMA, no download, meaningless text (:mod:`.seeded`).

Both end with one table (:func:`render_summary`) and ``summary.json``.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..errors import LlamaTrtError
from .seeded import SIZES, make_demo_checkpoint, train_tokenizer
from .stages import DEMO_MARKER, prepare_out_dir
from .summary import ChatAnswer, DemoRow, DemoSummary, render_summary

DEMO_SIZES = ("smollm2", *SIZES)


def run_demo(out_dir="llama-trt-demo", *, size: str = "smollm2", force: bool = False, console=None,
             **options) -> DemoSummary:
    """Run the demo into ``out_dir``; returns the summary (also written to ``out_dir/summary.json``).

    ``options`` go to the chosen demo (e.g. ``engines=False`` or ``questions=(...)`` for smollm2).
    """
    from rich.console import Console

    if size not in DEMO_SIZES:
        raise LlamaTrtError(f"unknown demo size {size!r}; choose one of {', '.join(DEMO_SIZES)}")
    console = console or Console(stderr=True)
    started = time.perf_counter()
    out = Path(out_dir)
    prepare_out_dir(out, force)

    def stage(msg: str) -> None:
        console.rule(f"[bold]{msg}")

    if size == "smollm2":
        from .real import run_smollm2

        return run_smollm2(out, console=console, stage=stage, started=started, **options)
    from .seeded import run_seeded

    return run_seeded(out, size=size, console=console, stage=stage, started=started, **options)


__all__ = ["DEMO_MARKER", "DEMO_SIZES", "ChatAnswer", "DemoRow", "DemoSummary", "make_demo_checkpoint",
           "render_summary", "run_demo", "train_tokenizer"]
