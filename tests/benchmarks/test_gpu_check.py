"""The prepared GPU check (scripts/gpu_check.sh) runs end to end on a CPU before device time is spent.

``--cpu-smoke`` runs every stage with tiny sizes: the GPU parity tests (they skip without
CUDA, which proves they are collected), the kernel benchmark with the kernels in Triton's
interpreter, and the torch backend with the Triton kernels routed behind the custom ops on
the CPU, checked against transformers in float32 (the independent reference).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

# find_spec, not importorskip: importing triton here, at collection, would keep
# tests/plugins/test_kernels.py from setting TRITON_INTERPRET=1 before triton's first import.
if importlib.util.find_spec("triton") is None or importlib.util.find_spec("transformers") is None:
    pytest.skip("needs triton and transformers (the kernels and kernels/dev extras)", allow_module_level=True)

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_cpu_smoke(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), str(out), "--cpu-smoke"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["ok"] and report["smoke"]
    stages = report["stages"]

    tests = stages["tests"]  # collected, skipped for want of CUDA, nothing failed
    assert tests["tests"] >= 100 and tests["skipped"] == tests["tests"] and not tests["failures"]

    bench = stages["bench"]["report"]
    kernels = {r["kernel"] for r in bench["results"]}
    assert kernels == {"rms_norm", "rms_norm_residual", "rope_half", "rope_interleaved"}
    for row in bench["results"]:  # Triton (interpreted) vs eager torch on the same inputs, float32
        assert row["max_abs_diff_vs_eager"] < 1e-5, row
        assert row["triton_median_ms"] > 0 and row["fraction_of_copy_bw"] >= 0

    model = stages["model"]["report"]
    assert [r["dtype"] for r in model["results"]] == ["fp16", "bf16"]
    for r in model["results"]:
        assert r["triton_kernel_calls"]["rms_norm"] > 0 and r["triton_kernel_calls"]["rope"] > 0
        assert r["greedy_vs_cpu_fp32_reference"]["equal"], r
        assert r["teacher_forced_vs_reference"]["top1_agreement"] == 1.0
        assert set(r["decode"]) == {"batch1", "batch2"}
        assert all(d["llama_trt_torch_tok_s"] > 0 and d["transformers_eager_tok_s"] > 0 for d in r["decode"].values())

    md = (out / "gpu_check.md").read_text()
    assert "verdict: ok" in md and "| rope_half | float32 |" in md and "| fp16 | True |" in md
