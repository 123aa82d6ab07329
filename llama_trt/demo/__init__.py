"""``llama-trt demo``: the whole pipeline in one command.

* ``--size smollm2`` (default): SmolLM2-135M-Instruct, a real trained chat model (:mod:`.real`).
* ``--size tiny|small``: a seeded random LLaMA, no download, meaningless text (:mod:`.seeded`).

Both end with one table (:func:`render_summary`) and ``summary.json``.
"""

from __future__ import annotations

import functools
import time
from dataclasses import replace
from pathlib import Path

from ..errors import LlamaTrtError
from .seeded import SIZES, make_demo_checkpoint, train_tokenizer
from .stages import DEMO_MARKER, prepare_out_dir, write_summary
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

    marks: list[tuple[str, float]] = []

    def stage(msg: str) -> None:
        marks.append((msg, time.perf_counter()))
        console.rule(f"[bold]{msg}")

    if size == "smollm2":
        from .real import run_smollm2 as run
    else:
        from .seeded import run_seeded

        run = functools.partial(run_seeded, size=size)
    summary = run(out, console=console, stage=stage, started=started, **options)
    ends = [t for _, t in marks[1:]] + [time.perf_counter()]
    timed = replace(summary, stage_seconds=tuple((m, round(end - t, 1)) for (m, t), end in zip(marks, ends)))
    write_summary(out, timed, size)
    return timed


__all__ = ["DEMO_MARKER", "DEMO_SIZES", "ChatAnswer", "DemoRow", "DemoSummary", "make_demo_checkpoint",
           "render_summary", "run_demo", "train_tokenizer"]
