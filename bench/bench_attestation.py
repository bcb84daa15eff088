"""Attestation verification benchmark (run by hand: python bench/bench_attestation.py [--seconds 1.0]).

One run measures, against a baseline measured in the same run:
* raw: one ECDSA P-384 / SHA-384 verification with ``cryptography`` (public key loaded once, the
  real VCEK key and the real 0x2A0-byte signed part of a report);
* SNP cached: ``verify_report`` with the same certificates again (chain verdict cached);
* SNP cold: ``verify_report`` after ``clear_caches()`` (parsing + the whole RSA-PSS chain).
Goal: SNP cached >= 0.8x raw.

If ``bench/_tdx_bench.py`` exists (TDX side), its ``run_tdx()`` rows are measured in the same run
and printed in the same table, with its ratio lines.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
VECTORS = ROOT.parent / "shared" / "vectors"

from cryptography.hazmat.primitives import hashes  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature  # noqa: E402

from attestation.snp import clear_caches, parse_report, verify_report  # noqa: E402
from attestation.snp.certs import load_certificate  # noqa: E402
from _timing import best_rates  # noqa: E402  (bench/ is on sys.path: the running script's folder)


def snp_rows(seconds: float) -> list[tuple[str, float]]:
    expected = json.loads((VECTORS / "expected.json").read_text())
    v = next(v for v in expected["snp"] if v["report"] == "snp/virtee-sev--report_milan.hex")
    report = bytes.fromhex((VECTORS / v["report"]).read_text().strip())
    vek = (VECTORS / v["vek"]).read_bytes()
    chain = (VECTORS / v["ask_ark"]).read_bytes()
    from datetime import datetime
    at = datetime.fromisoformat(v["vek_not_before"]) + timedelta(days=1)

    parsed = parse_report(report)
    public_key = load_certificate(vek).public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    signature = encode_dss_signature(parsed.signature_r, parsed.signature_s)
    signed = report[:0x2A0]
    algorithm = ec.ECDSA(hashes.SHA384())

    def raw() -> None:
        public_key.verify(signature, signed, algorithm)

    def cached() -> None:
        verify_report(report, vek=vek, chain=[chain], at=at)

    def cold() -> None:
        clear_caches()
        verify_report(report, vek=vek, chain=[chain], at=at)

    raw_rate, cached_rate, cold_rate = best_rates([raw, cached, cold], seconds, rounds=5, batch=10)
    return [("raw ECDSA P-384 verify (cryptography)", raw_rate),
            ("SNP verify_report, chain cached", cached_rate),
            ("SNP verify_report, cold (caches cleared)", cold_rate)]


def tdx_part(seconds: float) -> tuple[list[tuple[str, float]], list[str]]:
    path = Path(__file__).with_name("_tdx_bench.py")
    if not path.is_file():
        return [], ["TDX: bench/_tdx_bench.py not present; TDX rows skipped"]
    spec = importlib.util.spec_from_file_location("_tdx_bench", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        rows = list(module.run_tdx(seconds))
    except TypeError:
        rows = list(module.run_tdx())
    lines = getattr(module, "TDX_RATIO_LINES", None)
    if callable(lines):
        lines = lines(rows)
    if lines is None and hasattr(module, "ratio_lines"):
        lines = module.ratio_lines(rows)
    if lines is None:  # no ratio lines exported: ratios of each TDX row against the dcap-qvl row
        base = next((ops for label, ops in rows if "dcap-qvl" in label), None)
        lines = [f"{label} / dcap-qvl: {ops / base:.2f}x" for label, ops in rows
                 if base and "dcap-qvl" not in label]
    return rows, [str(x) for x in lines]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.5, help="measuring time per row (split in 5 interleaved rounds)")
    args = parser.parse_args(argv)

    snp = snp_rows(args.seconds)
    tdx, tdx_lines = tdx_part(args.seconds)
    width = max(len(label) for label, _ in snp + tdx)
    print(f"{'benchmark'.ljust(width)}  {'ops/s':>10}  {'us/op':>9}")
    for label, ops in snp + tdx:
        print(f"{label.ljust(width)}  {ops:10.0f}  {1e6 / ops:9.1f}")
    raw, cached, cold = (ops for _, ops in snp)
    ratio = cached / raw
    print()
    print(f"SNP cached / raw P-384 verify: {ratio:.2f}x (goal >= 0.80x) {'OK' if ratio >= 0.8 else 'BELOW GOAL'}")
    print(f"SNP cold   / raw P-384 verify: {cold / raw:.2f}x (whole chain incl. RSA-PSS; informational)")
    for line in tdx_lines:
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
