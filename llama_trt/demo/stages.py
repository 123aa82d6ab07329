"""The stages both demos share: the output folder, export + validate, engines, bench."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..outputs import DEMO_KIND, MANIFEST, check_output, manifest_kind
from .summary import DemoRow

DEMO_MARKER = "demo-summary.json"


def prepare_out_dir(out: Path, force: bool) -> None:
    """An earlier demo folder is replaced as it is; anything else only as :mod:`llama_trt.outputs` allows."""
    earlier = manifest_kind(out) == DEMO_KIND
    check_output(out, force=force or earlier, option="--out")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).write_text(json.dumps({"kind": DEMO_KIND}))  # written first: a cut-short demo is ours too


def dir_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.suffix in (".onnx", ".data", ".plan"))


def key_metric(report) -> str:
    kl = report.metric("kl").value
    top1 = report.metric("top1").value
    return f"KL {kl:.1e}, top-1 {top1:.1%}"


def export_all(ckpt: Path, out: Path, plans: dict[str, dict], stage) -> dict[str, Path]:
    """``plans``: {folder name: export keywords}; returns {name: export folder}."""
    from ..exporter import export

    exports = {}
    for name, kw in plans.items():
        stage(f"export {name}")
        exports[name] = out / name
        export(ckpt, exports[name], force=True, progress=True, **kw)
    return exports


def validate_all(exports: dict[str, Path], ckpt: Path, out: Path, stage, console, *, steps: int,
                 tolerances: dict[str, dict] | None = None) -> dict:
    """Validate each export against torch fp32 (report JSON + plot); {name: (report, json, png)}."""
    from ..validate import validate
    from ..validate.render import plot_report

    reports = {}
    (out / "reports").mkdir(exist_ok=True)
    for name, path in exports.items():
        stage(f"validate {name} against torch fp32 (accuracy certificate over real text)")
        report = validate(path, ckpt, steps=steps, progress=True, tolerances=(tolerances or {}).get(name),
                          run_results_path=out / "reports" / f"{name}.run_results.json")
        report_path, plot_path = out / "reports" / f"{name}.json", out / "reports" / f"{name}.png"
        report.save(report_path)
        plot_report(report, plot_path)
        reports[name] = (report, report_path, plot_path)
        console.print(f"{name}: {'pass' if report.passed else 'FAIL'} ({key_metric(report)})")
    return reports


def bench_all(exports: dict[str, Path], *, prompt_len: int, new_tokens: int, runs: int) -> dict[str, float]:
    from ..runtime.bench import bench
    from ..runtime.sessions import open_session

    speeds = {}
    for name, path in exports.items():
        with open_session(path, "onnxruntime") as session:
            b = bench(session, prompt_len=prompt_len, new_tokens=new_tokens, runs=runs, bandwidth_gib=None,
                      artifact=str(path))
        speeds[name] = b.decode_tokens_per_s_median
    return speeds


def export_rows(exports: dict[str, Path], reports: dict, speeds: dict[str, float]) -> list[DemoRow]:
    rows = []
    for name, path in exports.items():
        report, report_path, plot_path = reports[name]
        rows.append(DemoRow(name, str(path), dir_size(path), "pass" if report.passed else "FAIL",
                            key_metric(report), speeds.get(name), str(report_path), str(plot_path)))
    return rows


def build_engines(out: Path, exports: dict[str, Path], console, notes: list[str], *, max_seq: int,
                  max_context: int) -> list[DemoRow]:
    """An engine per export when a TensorRT flavour is importable (ahead of time without a GPU)."""
    from ..errors import BackendUnavailableError
    from ..trt_engines.backend import detect_backend
    from ..trt_engines.builder import BuildOptions, build_engine

    try:
        backend = detect_backend()
    except BackendUnavailableError as e:
        notes.append(f"no TensorRT engines: {e}")
        console.print(f"skipped: {e}")
        return []
    rows = []
    for name, export_dir in exports.items():
        engine_name = name.replace("onnx", "engine")
        path = out / engine_name
        options = BuildOptions(max_batch=4, max_seq=max_seq, max_context=max_context, force=True, progress=True)
        build_engine(export_dir, path, options)
        verdict = "built" if gpu_present() else "built AOT (no GPU here to run it)"
        rows.append(DemoRow(f"{engine_name} ({backend.name})", str(path), dir_size(path), verdict, "-", None))
    return rows


def gpu_present() -> bool:
    from ..trt_engines.compat import gpu_compute_capability

    try:
        return gpu_compute_capability() is not None
    except Exception:  # noqa: BLE001 - no driver / no device
        return False


def write_summary(out: Path, summary, size: str) -> None:
    (out / "summary.json").write_text(json.dumps(summary.to_dict(), indent=2))
    (out / DEMO_MARKER).write_text(json.dumps({"made_by": "llama-trt demo", "size": size}))
