"""TDX quote verification throughput: ours (cached / cold) against dcap-qvl on the same quote and collateral.

Run by hand: `python bench/_tdx_bench.py`. bench/bench_attestation.py imports run_tdx().
Quote: go-tdx-guest v5 sample; collateral: pcs-2026-02; time 2026-02-03 (inside every validity window).
"cold" clears every cache (chains, collateral and CRL results, parsed PEM/extension caches) before each
verification of the raw quote bytes; the Collateral object is the caller's input and is reused. A fourth row
also re-parses the collateral files on every verification. Rates are best-of-rounds, rounds interleaved, to
damp the noise of a shared machine.
"""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import dcap_qvl  # noqa: E402
from _timing import best_rates  # noqa: E402  (bench/ is on sys.path: the running script's folder)

from attestation.tdx import clear_caches, collateral_from_files, load_collateral_dir, verify_quote  # noqa: E402
from attestation.tdx.collateral import qvl_collateral_fields  # noqa: E402

VECTORS = ROOT.parent / "shared" / "vectors"
QUOTE = VECTORS / "tdx" / "go-tdx-guest--quote_v5_sample.dat"
COLLATERAL = VECTORS / "tdx" / "collateral" / "pcs-2026-02"
AT = datetime(2026, 2, 3, tzinfo=timezone.utc)


def run_tdx(seconds: float = 2.0) -> list[tuple[str, float]]:
    """(label, verifications per second): ours cached, ours cold, dcap-qvl, ours cold incl. collateral parse."""
    raw = QUOTE.read_bytes()
    collateral = load_collateral_dir(COLLATERAL)
    files = dict(collateral.files)
    peer = dcap_qvl.QuoteCollateralV3(**qvl_collateral_fields(collateral))
    now_secs = int(AT.timestamp())

    expected = verify_quote(raw, collateral=collateral, at=AT).tcb_status
    assert expected == dcap_qvl.verify(raw, peer, now_secs).status == "UpToDate"

    def ours_cached() -> None:
        verify_quote(raw, collateral=collateral, at=AT)

    def ours_cold() -> None:
        clear_caches()
        verify_quote(raw, collateral=collateral, at=AT)

    def ours_cold_parse() -> None:
        clear_caches()
        verify_quote(raw, collateral=collateral_from_files(files), at=AT)

    def theirs() -> None:
        dcap_qvl.verify(raw, peer, now_secs)

    rates = best_rates([ours_cached, ours_cold, theirs, ours_cold_parse], seconds, rounds=6)
    clear_caches()
    return [
        ("tdx ours (chain+collateral cached)", rates[0]),
        ("tdx ours (cold: caches cleared)", rates[1]),
        ("tdx dcap-qvl", rates[2]),
        ("tdx ours (cold + collateral files parsed)", rates[3]),
    ]


def main() -> None:
    rows = run_tdx()
    width = max(len(label) for label, _ in rows)
    for label, rate in rows:
        print(f"{label:<{width}}  {rate:10.1f} verifications/s")
    baseline = rows[2][1]
    print(f"ratio cached/dcap-qvl: {rows[0][1] / baseline:.2f}x (goal >= 2.0)")
    print(f"ratio cold/dcap-qvl:   {rows[1][1] / baseline:.2f}x (goal >= 0.5)")
    print(f"ratio cold+parse/dcap-qvl: {rows[3][1] / baseline:.2f}x")


if __name__ == "__main__":
    main()
