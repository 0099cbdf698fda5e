"""The GPU check must be known to work before a GPU is at hand: run its --smoke mode on CPU."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_smoke_runs_and_reports_mfu():
    env = {**os.environ, "PYTHON": sys.executable, "XLA_FLAGS": "", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(["bash", str(ROOT / "benchmarks/gpu_check.sh"), "--smoke"], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith(("dense ", "moe "))]
    assert len(rows) == 2, out.stdout
    for row in rows:
        mfu = float(re.search(r"([\d.]+)%\s*$", row).group(1))
        assert 0 < mfu < 100, row
    assert "dropless" in out.stdout and "capacity" in out.stdout  # the dispatch table ran too
