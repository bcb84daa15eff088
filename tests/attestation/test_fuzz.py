"""The fuzz entry point runs on every parser and lets only library errors escape (small CI run)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

FUZZ = Path(__file__).resolve().parents[2] / "bench" / "fuzz.py"
PARSERS = ("snp_report", "tdx_quote", "tdx_eventlog", "pck_extension", "tcb_info_json", "qe_identity_json", "vek_extensions",
           "vek_certificate", "snp_cert_table", "evidence_cmw", "evidence_json", "policy_yaml",
           "attested_certificate")
# Whole verify_evidence() runs on mutated reports/quotes, certificates and collateral files.
WHOLE_VERIFICATION = ("verify_snp", "verify_tdx", "verify_snp_certs", "verify_tdx_collateral")
ITERATIONS = 3000


def test_fuzz_small_run_covers_every_target():
    proc = subprocess.run([sys.executable, str(FUZZ), "--iterations", str(ITERATIONS), "--seed", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    lines = {line.split()[0]: line.split() for line in proc.stdout.splitlines() if line.strip()}
    targets = PARSERS + WHOLE_VERIFICATION
    for name in targets:
        assert name in lines, proc.stdout
        assert int(lines[name][1]) >= ITERATIONS // len(targets)  # inputs
        assert lines[name][4] == "0"  # escapes
    assert int(proc.stdout.split("total inputs: ")[1].split()[0]) >= ITERATIONS - len(targets)


def test_mutations_change_inputs():
    sys.path.insert(0, str(FUZZ.parent))
    try:
        import fuzz  # type: ignore[import-not-found]
    finally:
        sys.path.pop(0)
    import random

    rng = random.Random(5)
    seed = bytes(range(200))
    outputs = {fuzz.mutate(rng, seed, [seed, b"other"]) for _ in range(200)}
    assert len(outputs) > 150
    assert any(len(o) != len(seed) for o in outputs) and any(len(o) == len(seed) for o in outputs)


def test_fuzz_whole_snp_verification():
    proc = subprocess.run([sys.executable, str(FUZZ), "--iterations", "300", "--seed", "1", "--only", "verify_snp"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "verify_snp" in proc.stdout and "total inputs: 300" in proc.stdout
