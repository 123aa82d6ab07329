"""The stages both demos share: the output folder, export + validate, engines, bench."""

from __future__ import annotations

import json
import shutil
import time
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
                 tolerances: dict[str, dict] | None = None, kernel_forms: bool = False) -> dict:
    """Validate each export against torch fp32 (report JSON + plot); {name: (report, json, png)}.

    One :class:`TorchReference` serves every export: the fp32 side (the certificate text's
    logits above all) runs once, and each report is what a lone ``validate`` gives.
    ``kernel_forms``: first let a quantized export exported with ``certify=False`` choose its
    ONNX Runtime kernel form by certificate, as ``llama-trt export`` does by default."""
    from ..validate import validate
    from ..validate.reference import TorchReference
    from ..validate.render import plot_report

    reports = {}
    (out / "reports").mkdir(exist_ok=True)
    reference = TorchReference(ckpt)
    for name, path in exports.items():
        if kernel_forms:
            _choose_kernel_form(path, reference, lambda m: stage(f"{m} {name}"))
        stage(f"validate {name} against torch fp32 (accuracy certificate over real text)")
        report = validate(path, ckpt, steps=steps, progress=True, tolerances=(tolerances or {}).get(name),
                          run_results_path=out / "reports" / f"{name}.run_results.json", reference=reference)
        report_path, plot_path = out / "reports" / f"{name}.json", out / "reports" / f"{name}.png"
        report.save(report_path)
        plot_report(report, plot_path)
        reports[name] = (report, report_path, plot_path)
        console.print(f"{name}: {'pass' if report.passed else 'FAIL'} ({key_metric(report)})")
    reference.release()
    return reports


def _choose_kernel_form(path: Path, reference, stage) -> None:
    """The export's ONNX Runtime kernel form chosen by certificate (``quantize.kernel_form``), if
    it records a choice not yet made."""
    from ..exporter import load_manifest
    from ..quantize.kernel_form import KEY
    from ..quantize.pipeline import certify_export

    manifest = load_manifest(path)
    record = (manifest.quantization or {}).get(KEY)
    if isinstance(record, dict) and not record.get("trials"):
        stage("choose the ONNX Runtime kernel form by certificate for")
        certify_export(path, reference.checkpoint, manifest, progress=True, reference=reference)


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
    from ..trt_engines.builder import BuildOptions

    try:
        backend = detect_backend()
    except BackendUnavailableError as e:
        notes.append(f"no TensorRT engines: {e}")
        console.print(f"skipped: {e}")
        return []
    gpu = gpu_present()
    jobs = {name.replace("onnx", "engine"): export_dir for name, export_dir in exports.items()}
    options = BuildOptions(max_batch=4, max_seq=max_seq, max_context=max_context, force=True, progress=True)
    build_side_by_side({out / name: export_dir for name, export_dir in jobs.items()}, options, console,
                       workers=1 if gpu else cpu_count())
    verdict = "built" if gpu else "built AOT (no GPU here to run it)"
    return [DemoRow(f"{name} ({backend.name})", str(out / name), dir_size(out / name), verdict, "-", None)
            for name in jobs]


def build_side_by_side(jobs: dict[Path, Path], options, console, *, workers: int) -> None:
    """Build ``{engine folder: export folder}`` with ``options``, up to ``workers`` at once.

    An ahead-of-time TensorRT-RTX build is one CPU thread that keeps the GIL (measured here: two
    builds in two threads took turns, 36 s either way), so side by side means processes: each
    build is then ``llama-trt build`` in a child (a subprocess, not multiprocessing, which would
    re-import the caller's main script). With a GPU the demo passes ``workers=1``: TensorRT
    times its kernels on the GPU, and two builds at once would skew each other's choices.
    """
    from ..trt_engines.builder import build_engine

    workers = max(1, min(workers, len(jobs)))
    if workers == 1:
        for engine_dir, export_dir in jobs.items():
            build_engine(export_dir, engine_dir, options)
        return
    started, running = time.perf_counter(), []
    try:
        with console.status(f"building {len(jobs)} engines side by side ({workers} processes)"):
            for engine_dir, export_dir in jobs.items():
                if len(running) == workers:
                    _finish(*running.pop(0), started, console)
                running.append(_start_build(engine_dir, export_dir, options))
            while running:
                _finish(*running.pop(0), started, console)
    finally:
        for _, proc, log in running:  # one build failed (or Ctrl-C): stop the others
            proc.terminate()
            proc.wait()
            log.close()


def _start_build(engine_dir: Path, export_dir: Path, options):
    """``llama-trt build`` for the demo's :class:`BuildOptions` (its limits and --force) in a child."""
    import subprocess
    import sys
    import tempfile

    flags = [f"--max-batch={options.max_batch}"]
    flags += [f"--max-seq={options.max_seq}"] if options.max_seq else []
    flags += [f"--max-context={options.max_context}"] if options.max_context else []
    flags += ["--force"] if options.force else []
    log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a chatty child never blocks
    argv = [sys.executable, "-m", "llama_trt.cli", "build", str(export_dir), "-o", str(engine_dir), *flags]
    return engine_dir, subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT), log


def _finish(engine_dir: Path, proc, log, started: float, console) -> None:
    """Wait for one child build; its last output line is the error when it failed."""
    from ..errors import BuildError

    with log:
        code = proc.wait()
        log.seek(0)
        lines = [ln.strip() for ln in log.read().splitlines() if ln.strip()]
    if code != 0:
        raise BuildError(f"building {engine_dir.name} failed: {lines[-1] if lines else f'exit code {code}'}")
    console.print(f"{engine_dir.name}: built ({time.perf_counter() - started:.0f} s)")


def cpu_count() -> int:
    """CPUs this process may run on (the affinity mask where the OS has one)."""
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def gpu_present() -> bool:
    from ..trt_engines.compat import gpu_compute_capability

    try:
        return gpu_compute_capability() is not None
    except Exception:  # noqa: BLE001 - no driver / no device
        return False


def write_summary(out: Path, summary, size: str) -> None:
    (out / "summary.json").write_text(json.dumps(summary.to_dict(), indent=2))
    (out / DEMO_MARKER).write_text(json.dumps({"made_by": "llama-trt demo", "size": size}))
