"""What a demo run found, as data (:class:`DemoSummary`), and its rendering as a rich table."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class DemoRow:
    artifact: str
    path: str
    size_bytes: int
    verdict: str                 # "pass" | "FAIL" | "built AOT (no GPU here to run it)" | ...
    key_metric: str              # e.g. "KL 1e-9, top-1 100%"
    tokens_per_s: float | None
    report: str | None = None
    plot: str | None = None


@dataclass(frozen=True)
class ChatAnswer:
    """One chat question answered greedily by our ONNX Runtime export and by transformers."""

    question: str
    ours: str
    transformers: str | None     # None when transformers was not run (seeded demo)
    same_tokens: bool | None


@dataclass(frozen=True)
class DemoSummary:
    out_dir: str
    checkpoint: str
    model: str                   # "SmolLM2-135M-Instruct" or "seeded random (tiny)"...
    rows: tuple[DemoRow, ...]
    prompt: str
    generated_text: str
    seconds: float
    notes: tuple[str, ...] = field(default=())
    chat: tuple[ChatAnswer, ...] = field(default=())
    stage_seconds: tuple[tuple[str, float], ...] = field(default=())   # (stage, wall seconds), in order

    @property
    def passed(self) -> bool:
        return all(r.verdict != "FAIL" for r in self.rows)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["passed"] = self.passed
        return d


def render_summary(summary: DemoSummary, console=None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"llama-trt demo: {summary.model} ({summary.seconds:.0f} s)")
    for col in ("artifact", "size", "validation", "accuracy vs torch fp32", "decode tok/s"):
        table.add_column(col)
    for r in summary.rows:
        table.add_row(r.artifact, f"{r.size_bytes / 2**20:.1f} MiB", r.verdict, r.key_metric,
                      f"{r.tokens_per_s:.0f}" if r.tokens_per_s else "-")
    console.print(table)
    if summary.chat:
        chat = Table(title="chat (greedy): our ONNX Runtime export next to transformers", show_lines=True)
        for col in ("question", "llama-trt", "transformers", "same tokens"):
            chat.add_column(col)
        for a in summary.chat:
            same = "-" if a.same_tokens is None else ("yes" if a.same_tokens else "no")
            chat.add_row(escape(a.question), escape(a.ours), escape(a.transformers or "-"), same)
        console.print(chat)
    if summary.generated_text:
        console.print(f"prompt:      {escape(summary.prompt)}")
        console.print(f"continuation: {escape(summary.generated_text)}")
    for r in summary.rows:
        if r.report:
            console.print(f"report {r.artifact}: {r.report}  plot: {r.plot}")
    if summary.stage_seconds:
        console.print("time per stage: " + ", ".join(f"{name.split(' ')[0]} {sec:.0f} s"
                                                    for name, sec in summary.stage_seconds))
    for n in summary.notes:
        console.print(f"note: {escape(n)}")
    console.print(f"summary: {Path(summary.out_dir) / 'summary.json'}")
