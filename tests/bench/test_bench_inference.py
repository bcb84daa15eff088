"""Smoke tests of bench/bench_inference.py (direct path only; the gateways' figures are for runs by hand)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"


@contextmanager
def fast_backend(tmp_path: Path) -> Iterator[str]:
    """The benchmark's SSE backend without pacing; yields its port."""
    port_file = tmp_path / "port"
    backend = subprocess.Popen([sys.executable, str(BENCH / "_sse_backend.py"), "--port-file", str(port_file),
                                "--interval-ms", "0"])
    try:
        for _ in range(200):
            if port_file.exists() and port_file.read_text():
                break
            time.sleep(0.05)
        yield port_file.read_text()
    finally:
        backend.kill()
        backend.wait()


def test_quick_direct_run_streams_every_event() -> None:
    done = subprocess.run([sys.executable, str(BENCH / "bench_inference.py"), "--quick", "--paths", "direct"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr + done.stdout
    rows = {int(m.group(1)): m for m in re.finditer(
        r"^direct\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(\d+)\s+(\d+)\s+(\d+)", done.stdout, re.M)}
    assert set(rows) == {1, 8}, done.stdout
    # --quick: 2 rounds of 3 streams one after another, then 8 concurrent x 2; 256 events each, none failed;
    # the table pools the rounds
    assert (int(rows[1].group(6)), int(rows[1].group(7)), int(rows[1].group(8))) == (2 * 3 * 256, 2 * 3, 0)
    assert (int(rows[8].group(6)), int(rows[8].group(7)), int(rows[8].group(8))) == (2 * 16 * 256, 2 * 16, 0)
    assert float(rows[1].group(2)) > 0   # a TTFT was measured
    assert len(re.findall(r"^  round [12] direct ", done.stdout, re.M)) == 4, done.stdout


def test_loadgen_refuses_a_short_stream(tmp_path: Path) -> None:
    """The load generator counts a stream only when every event arrived: here the backend sends 256, it expects 300."""
    with fast_backend(tmp_path) as port:
        done = subprocess.run([sys.executable, str(BENCH / "_loadgen.py"), "run", "--port", port,
                               "--model", "bench-stream", "--events", "300", "--requests", "2"],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
        assert result["streams"] == 0 and result["error_count"] == 2
        assert "ended after 256 of 300 events" in result["errors"][0]


def test_loadgen_writes_a_large_result_whole(tmp_path: Path) -> None:
    """64 streams make a result of ~400 KiB: into --out it arrives whole (through a pipe it came out cut)."""
    out = tmp_path / "result.json"
    with fast_backend(tmp_path) as port:
        done = subprocess.run([sys.executable, str(BENCH / "_loadgen.py"), "run", "--port", port,
                               "--model", "bench-stream", "--events", "256", "--concurrency", "64",
                               "--requests", "3", "--out", str(out)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout == ""
        result = json.loads(out.read_text())
        assert out.stat().st_size > 256 * 1024
        assert (result["streams"], result["error_count"]) == (192, 0)
        assert len(result["ttft_ns"]) == 192 and len(result["delay_ns"]) == 192 * 255


def test_plain_launcher_turns_the_ledger_sink_into_a_no_op() -> None:
    """The bench-only baseline: after disable_ledger, Ledger.record keeps nothing (in a child: no leak here)."""
    code = """
import sys
sys.path.insert(0, sys.argv[1])
from _enclave_plain import disable_ledger
from enclave.usage.ledger import Ledger
real = Ledger.record
disable_ledger()
assert Ledger.record is not real
class Probe:
    def __getattr__(self, name):
        raise AssertionError(f"the disabled sink touched the ledger: {name}")
assert Ledger.record(Probe(), object()) is None
print("disabled")
"""
    done = subprocess.run([sys.executable, "-c", code, str(BENCH)], capture_output=True, text=True, timeout=60,
                          cwd=ROOT)
    assert done.returncode == 0 and done.stdout.strip() == "disabled", done.stderr
