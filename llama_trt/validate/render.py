"""Presenting a :class:`ValidationReport`: a compact rich table and a matplotlib plot (Agg)."""

from __future__ import annotations

from pathlib import Path

from .report import ValidationReport


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if x == 0:
            return "0"
        if abs(x) >= 1e4 or abs(x) < 1e-3:
            return f"{x:.3g}"
        return f"{x:.4g}"
    return str(x)


def _verdict(passed) -> str:
    if passed is None:
        return "[dim]info[/dim]"
    return "[green]pass[/green]" if passed else "[bold red]FAIL[/bold red]"


def render_report(report: ValidationReport, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    title = (
        f"validate {report.artifact_kind} ({report.precision}, {report.backend}) vs torch fp32 - "
        + ("[green]PASSED[/green]" if report.passed else "[bold red]FAILED[/bold red]")
    )
    table = Table(title=title, title_justify="left")
    table.add_column("output / metric")
    table.add_column("value", justify="right")
    table.add_column("gate (atol / rtol)", justify="right")
    table.add_column("", justify="center")
    for o in sorted(report.worst_outputs(), key=lambda o: (o.output != "logits", o.output)):
        table.add_row(
            f"{o.output} [dim]max abs @{o.feed}[/dim]", _fmt(o.max_abs), f"{o.atol:g} / {o.rtol:g}",
            _verdict(o.passed),
        )
    for m in report.metrics:
        thr = "-" if m.threshold is None else f"{m.op} {m.threshold:g}"
        table.add_row(m.name, _fmt(m.value), thr, _verdict(m.passed))
    g = report.greedy
    div = "none" if g.first_divergence is None else f"step {g.first_divergence}"
    if g.first_divergence is not None and g.top1_margin_at_divergence is not None:
        div += f" (ref top-2 margin {g.top1_margin_at_divergence:.3g})"
    table.add_row(f"greedy divergence [dim]{g.steps} steps[/dim]", div, "-", _verdict(None))
    console.print(table)
    if report.layerwise is not None:
        lw = report.layerwise
        lt = Table(title=f"layer-wise ({lw.feed} feed): first failing layer = "
                   + ("none" if lw.first_failing_layer is None else f"{lw.first_failing_layer} ({lw.first_failing_point})"),
                   title_justify="left")
        lt.add_column("point")
        lt.add_column("max abs", justify="right")
        lt.add_column("max rel", justify="right")
        lt.add_column("atol / rtol", justify="right")
        lt.add_column("", justify="center")
        for p in lw.points:
            lt.add_row(p.point, _fmt(p.max_abs), _fmt(p.max_rel), f"{p.atol:g} / {p.rtol:g}", _verdict(p.passed))
        console.print(lt)
    for n in report.notes:
        console.print(f"[yellow]note:[/yellow] {n}")


def plot_report(report: ValidationReport, path) -> Path:
    """Max abs error per output group and feed, KL per greedy step, layer-wise error."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    panels = 3 if report.layerwise is not None else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.0))
    feeds = [f.name for f in report.feeds]
    ax = axes[0]
    for label, pred in (("logits", lambda o: o.output == "logits"),
                        ("present.* (max)", lambda o: o.output.startswith("present."))):
        ys = []
        for f in feeds:
            vals = [o.max_abs for o in report.outputs if o.feed == f and pred(o)]
            ys.append(max(vals) if vals else float("nan"))
        ax.plot(feeds, [max(y, 1e-12) for y in ys], marker="o", label=label)
    logit_atol = next((o.atol for o in report.outputs if o.output == "logits"), None)
    if logit_atol:
        ax.axhline(logit_atol, color="red", linestyle="--", linewidth=1, label="logits atol")
    ax.set_yscale("log")
    ax.set_title("max abs error per feed (prefill / decode)")
    ax.set_ylabel("max |candidate - torch fp32|")
    ax.legend(fontsize=8)
    ax.tick_params(axis="x", rotation=30)

    ax = axes[1]
    kl = report.greedy.kl_per_step
    if kl:
        ax.plot(range(len(kl)), [max(k, 1e-18) for k in kl], marker=".", label="KL(ref || cand)")
    thr = report.metric_thresholds.get("kl")
    if thr:
        ax.axhline(thr, color="red", linestyle="--", linewidth=1, label="KL gate (mean)")
    if report.greedy.first_divergence is not None:
        ax.axvline(report.greedy.first_divergence, color="orange", linewidth=1, label="first divergence")
    ax.set_yscale("log")
    ax.set_title(f"greedy generation: agreement {report.greedy.agreement:.0%}")
    ax.set_xlabel("step")
    ax.legend(fontsize=8)

    if report.layerwise is not None:
        ax = axes[2]
        pts = report.layerwise.points
        ax.plot([p.point for p in pts], [max(p.max_abs, 1e-12) for p in pts], marker="o")
        bad = [i for i, p in enumerate(pts) if not p.passed]
        if bad:
            ax.axvline(bad[0], color="red", linewidth=1, label=f"first failing: {pts[bad[0]].point}")
            ax.legend(fontsize=8)
        ax.set_yscale("log")
        ax.set_title("layer-wise max abs error")
        ax.tick_params(axis="x", rotation=75, labelsize=6)
    fig.suptitle(f"{Path(report.artifact).name}: {report.precision} {report.backend} "
                 f"({'PASSED' if report.passed else 'FAILED'})")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
