#!/usr/bin/env python
"""One prepared GPU check (issue 18): kernel parity tests, kernel benchmark, torch backend on CUDA.

    python benchmarks/gpu_check.py OUT_DIR [--cpu-smoke]      (or scripts/gpu_check.sh OUT_DIR)

Stages, each in its own process with its own time limit (a stage that fails or runs out of
time is recorded and the next one still runs):
  a. ``pytest -m gpu tests/plugins/test_kernels_gpu.py``: kernel parity at realistic sizes
     against float64 references (junit XML kept);
  b. ``benchmarks/bench_kernels.py``: median time, GB/s, fraction of the measured copy
     bandwidth, speed-up over torch eager and torch.compile, at hidden 576..8192;
  c. ``benchmarks/gpu_model_check.py``: the torch backend on CUDA with the Triton kernels
     behind the custom ops, a seeded model of SmolLM2-135M's shape, fp16 and bf16: greedy ids
     vs transformers fp32 on the CPU, decode tok/s at batch 1 and 8 vs transformers' CUDA eager.
Then it writes ``gpu_check.json`` and ``gpu_check.md`` into OUT_DIR. Exit 0 when every stage
ran and passed (tests green, greedy ids equal), 1 otherwise. The limits add up to < 8 minutes.

``--cpu-smoke`` runs the same stages on a CPU with tiny sizes (kernels in Triton's
interpreter): it proves the script works before device time is spent; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# stage limits in seconds (GPU run; sum 460 s < 8 min)
LIMITS = {"tests": 170, "bench": 170, "model": 120}
XDIST_WORKERS = 6
# most telling shapes first: torch.compile stops being timed once its budget is spent
GPU_BENCH = ["--tokens", "4096", "--shapes", "4096x32x128,2048x32x64,8192x64x128,576x9x64",
             "--warmup-ms", "25", "--rep-ms", "100", "--compile-budget-s", "80"]
SMOKE_BENCH = ["--device", "cpu", "--tokens", "4", "--shapes", "64x4x16", "--dtypes", "float32",
               "--rep-ms", "5", "--no-compile"]
TARGET_HIDDEN = 2048  # issue 18: >= 2x eager and >= 70% of copy bandwidth at hidden >= 2048


def _env(interpret: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return env


def run_stage(name: str, cmd: list[str], limit_s: float, env: dict, out: Path) -> dict:
    """Run one stage; stdout kept for parsing, stderr's tail saved next to the results."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=limit_s)
        rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        rc = None
        stdout = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
    (out / f"{name}.log").write_text(f"$ {' '.join(cmd)}\n--- stdout\n{stdout[-20000:]}\n--- stderr\n{stderr[-20000:]}")
    return {"command": " ".join(cmd[1:]), "returncode": rc, "timed_out": rc is None,
            "seconds": round(time.perf_counter() - t0, 1), "stdout": stdout}


def junit_summary(path: Path) -> dict:
    if not path.is_file():
        return {"error": "no junit report"}
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "failed": failed[:30]}


def stage_tests(out: Path, smoke: bool) -> dict:
    xml = out / "pytest_gpu.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/plugins/test_kernels_gpu.py", "-q",
           "-p", "no:cacheprovider", f"--junitxml={xml}"]
    if not smoke and importlib.util.find_spec("xdist") is not None:
        # compiling ~100 Triton kernel variants dominates this stage: spread it over processes
        cmd += ["-n", str(XDIST_WORKERS)]
    res = run_stage("tests", cmd, LIMITS["tests"], _env(interpret=False), out)
    res.pop("stdout")
    res.update(junit_summary(xml))
    # on a GPU every test must have run; in the smoke run (no CUDA) they skip, which proves the plumbing
    res["ok"] = res["returncode"] == 0 and (smoke or (res.get("passed", 0) > 0 and not res.get("skipped")))
    return res


def _parse_json(text: str) -> dict | None:
    start = text.find("{")
    try:
        return json.loads(text[start:]) if start >= 0 else None
    except json.JSONDecodeError:
        return None


def stage_bench(out: Path, smoke: bool) -> dict:
    cmd = [sys.executable, "benchmarks/bench_kernels.py", *(SMOKE_BENCH if smoke else GPU_BENCH)]
    res = run_stage("bench", cmd, LIMITS["bench"], _env(interpret=smoke), out)
    res["report"] = _parse_json(res.pop("stdout"))
    res["ok"] = res["returncode"] == 0 and res["report"] is not None
    if res["ok"]:
        rows = [r for r in res["report"]["results"] if r["shape"]["hidden"] >= TARGET_HIDDEN]
        res["targets"] = {
            "rows_at_hidden_ge_2048": len(rows),
            "all_ge_2x_eager": bool(rows) and all(r["speedup_vs_eager"] >= 2 for r in rows),
            "all_ge_70pct_copy_bw": bool(rows) and all(r["fraction_of_copy_bw"] >= 0.7 for r in rows),
        }
    return res


def stage_model(out: Path, smoke: bool) -> dict:
    cmd = [sys.executable, "benchmarks/gpu_model_check.py",
           *(["--cpu-smoke", "--batches", "1,2", "--new-tokens", "5"] if smoke else [])]
    res = run_stage("model", cmd, LIMITS["model"], _env(interpret=smoke), out)
    res["report"] = _parse_json(res.pop("stdout"))
    rows = (res["report"] or {}).get("results", [])
    res["greedy_equal"] = bool(rows) and all(r["greedy_vs_cpu_fp32_reference"]["equal"] for r in rows)
    res["kernels_used"] = bool(rows) and all(min(r["triton_kernel_calls"].values()) > 0 for r in rows)
    res["ok"] = res["returncode"] == 0 and res["greedy_equal"] and res["kernels_used"]
    return res


def _versions() -> dict:
    found = {"python": platform.python_version()}
    for name in ("torch", "triton", "transformers"):
        try:
            found[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001
            found[name] = None
    return found


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="folder for gpu_check.json, gpu_check.md and the stage logs")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (Triton interpreter)")
    p.add_argument("--stages", default="tests,bench,model", help="comma list (default: all)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    stages = {"tests": stage_tests, "bench": stage_bench, "model": stage_model}
    t0 = time.perf_counter()
    report = {"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "smoke": args.cpu_smoke,
              "versions": _versions(), "stages": {}}
    for name in args.stages.split(","):
        report["stages"][name] = stages[name](args.out, args.cpu_smoke)
        print(f"gpu_check: {name}: {'ok' if report['stages'][name]['ok'] else 'FAILED'} "
              f"({report['stages'][name]['seconds']} s)", file=sys.stderr)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    report["ok"] = all(s["ok"] for s in report["stages"].values())
    from gpu_check_report import render_markdown  # noqa: E402 - sibling script module

    _write(args.out / "gpu_check.json", json.dumps(report, indent=2))
    _write(args.out / "gpu_check.md", render_markdown(report))
    print(f"gpu_check: {'ok' if report['ok'] else 'FAILED'} in {report['seconds']} s; see {args.out}/gpu_check.md",
          file=sys.stderr)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
