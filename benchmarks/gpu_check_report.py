"""Markdown summary of a ``gpu_check.json`` report (see benchmarks/gpu_check.py)."""

from __future__ import annotations


def _fmt(v, suffix: str = "") -> str:
    return "-" if v is None else f"{v}{suffix}"


def _no_report(st: dict, log: str) -> str:
    return f"no report (returncode {st['returncode']}, timed out: {st['timed_out']}); see {log}"


def _tests_md(st: dict) -> list[str]:
    line = (f"passed {st.get('passed', '?')}, failed {st.get('failures', '?')}, errors {st.get('errors', '?')}, "
            f"skipped {st.get('skipped', '?')} ({st['seconds']} s{', TIMED OUT' if st['timed_out'] else ''})")
    out = ["## a. Kernel parity tests (`pytest -m gpu`)", "", line]
    out += [f"- failed: `{name}`" for name in st.get("failed", [])]
    return out


def _bench_md(st: dict) -> list[str]:
    out = ["## b. Kernel benchmark", ""]
    rep = st.get("report")
    if not rep:
        return out + [_no_report(st, "bench.log")]
    copy = rep["copy_bandwidth"]
    out += [f"{rep['device']}; {rep['method']}; {rep['tokens']} tokens; copy bandwidth {copy['gbs']} GB/s", "",
            "| kernel | dtype | hidden x heads x head_dim | Triton ms | GB/s | of copy BW | x eager | x compile |",
            "|---|---|---|---|---|---|---|---|"]
    for r in rep["results"]:
        s = r["shape"]
        out.append(f"| {r['kernel']} | {r['dtype']} | {s['hidden']}x{s['heads']}x{s['head_dim']} | "
                   f"{r['triton_median_ms']} | {r['triton_gbs']} | {r['fraction_of_copy_bw']:.0%} | "
                   f"{r['speedup_vs_eager']} | {_fmt(r['speedup_vs_compiled'])} |")
    t = st.get("targets") or {}
    out += ["", f"Targets at hidden >= 2048: >= 2x eager: {t.get('all_ge_2x_eager')}; "
                f">= 70% of copy bandwidth: {t.get('all_ge_70pct_copy_bw')}"]
    return out


def _model_md(st: dict) -> list[str]:
    out = ["## c. Torch backend with the Triton kernels", ""]
    rep = st.get("report")
    if not rep:
        return out + [_no_report(st, "model.log")]
    out += [f"{rep['model']}; {rep['device']}; reference: {rep['reference']}; {rep['new_tokens']} new tokens", "",
            "| dtype | greedy = ref | matching prefix | ref margin at divergence | teacher-forced top-1 | "
            "batch | ours tok/s | transformers eager tok/s | x |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in rep["results"]:
        g, f = r["greedy_vs_cpu_fp32_reference"], r["teacher_forced_vs_reference"]
        for name, d in r["decode"].items():
            out.append(f"| {r['dtype']} | {g['equal']} | {g['matching_prefix']}/{rep['new_tokens']} | "
                       f"{_fmt(g['ref_margin_at_divergence'])} | {f['top1_agreement']:.1%} | {name[5:]} | "
                       f"{d['llama_trt_torch_tok_s']} | {d['transformers_eager_tok_s']} | {d['speedup']} |")
    return out


def render_markdown(report: dict) -> str:
    v = report["versions"]
    head = [f"# GPU check {report['date_utc']} UTC{' (CPU smoke: figures mean nothing)' if report['smoke'] else ''}",
            "", f"verdict: {'ok' if report['ok'] else 'FAILED'} in {report['seconds']} s; "
                f"torch {v.get('torch')}, triton {v.get('triton')}, transformers {v.get('transformers')}, "
                f"Python {v.get('python')}", ""]
    parts = {"tests": _tests_md, "bench": _bench_md, "model": _model_md}
    body = []
    for name, st in report["stages"].items():
        body += parts[name](st) + [""]
    return "\n".join(head + body)
