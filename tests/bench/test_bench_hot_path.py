"""Smoke test of bench/bench_hot_path.py: it runs every configuration and prints its figures (not judged here)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_hot_path_bench_measures_every_configuration() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_hot_path.py"), "--requests", "200",
                           "--rounds", "1", "--idle", "0.2"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode in (0, 1), done.stderr + done.stdout   # 1: the goal missed, still a complete run
    for name in ("neither", "ledger", "limits+ledger"):
        assert re.search(rf"^\s+{re.escape(name)}\s+[\d.]+\s+\(", done.stdout, re.M), done.stdout
    assert re.search(r"limits\+ledger / neither = \d+\.\d{3} \(goal <= 1\.05\): (met|MISSED)", done.stdout)
