"""benchmarks/soak_serve.py at small counts: the soak runs, every kind of request is sent, and the
server passes it (0 hangs, 0 5xx, every valid request answered, clean SIGTERM exit)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_soak_smoke(tiny_export):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "soak_serve.py"), "--artifact", str(tiny_export),
                           "--requests", "60", "--concurrency", "8", "--hang-s", "30"],
                          capture_output=True, text=True, timeout=300)
    report = json.loads(proc.stdout)
    assert proc.returncode == 0 and report["ok"], (report, proc.stderr[-2000:])
    assert report["hangs"] == report["server_errors_5xx"] == report["unanswered_valid"] == 0
    assert all(report["by_kind"][k] > 0 for k in ("valid", "stream", "seeded", "invalid", "disconnect"))
    assert sum(report["by_kind"].values()) == 60
    statuses = {int(k) for k in report["statuses"]}
    assert 200 in statuses and statuses & {400, 404, 413, 415} and not any(s >= 500 for s in statuses)
    assert report["shutdown"]["exit_code"] == 0
