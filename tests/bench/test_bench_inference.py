"""Smoke tests of bench/bench_inference.py (direct path only; the gateways' figures are for runs by hand)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"


def test_quick_direct_run_streams_every_event() -> None:
    done = subprocess.run([sys.executable, str(BENCH / "bench_inference.py"), "--quick", "--paths", "direct"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr + done.stdout
    rows = {int(m.group(1)): m for m in re.finditer(
        r"^direct\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(\d+)\s+(\d+)\s+(\d+)", done.stdout, re.M)}
    assert set(rows) == {1, 8}, done.stdout
    # --quick: 3 streams one after another, then 8 concurrent x 2; 256 events each, none failed
    assert (int(rows[1].group(6)), int(rows[1].group(7)), int(rows[1].group(8))) == (3 * 256, 3, 0)
    assert (int(rows[8].group(6)), int(rows[8].group(7)), int(rows[8].group(8))) == (16 * 256, 16, 0)
    assert float(rows[1].group(2)) > 0   # a TTFT was measured


def test_loadgen_refuses_a_short_stream(tmp_path: Path) -> None:
    """The load generator counts a stream only when every event arrived: here the backend sends 256, it expects 300."""
    port_file = tmp_path / "port"
    backend = subprocess.Popen([sys.executable, str(BENCH / "_sse_backend.py"), "--port-file", str(port_file),
                                "--interval-ms", "0"])
    try:
        for _ in range(200):
            if port_file.exists() and port_file.read_text():
                break
            time.sleep(0.05)
        done = subprocess.run([sys.executable, str(BENCH / "_loadgen.py"), "run", "--port", port_file.read_text(),
                               "--model", "bench-stream", "--events", "300", "--requests", "2"],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
        assert result["streams"] == 0 and result["error_count"] == 2
        assert "ended after 256 of 300 events" in result["errors"][0]
    finally:
        backend.kill()
        backend.wait()
