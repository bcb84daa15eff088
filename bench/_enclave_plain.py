"""Bench-only launcher: ``cube-enclave`` with its usage ledger switched off, the baseline that prices the ledger.

The product has no switch for the ledger (every inference request is recorded); bench_inference needs an
enclave without it to measure what the ledger costs. This script replaces ``Ledger.record`` (the sink the app
appends to its recorder) with a no-op before handing its arguments to ``enclave.main.main``: the writer then
has nothing to write and the database gets no usage rows. Never a way to run an enclave: nothing outside
bench/ imports it, and bench_inference checks after the run that this enclave's database holds no usage rows
while the others hold one per request.

    python bench/_enclave_plain.py serve --simulate --config FILE ...   (the arguments of cube-enclave)
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def disable_ledger() -> None:
    """Make every enclave this process starts record no usage (bench-only)."""
    from enclave.inference.record import InferenceRecord
    from enclave.usage.ledger import Ledger

    def record_nothing(self: Ledger, record: InferenceRecord) -> None:
        return None

    Ledger.record = record_nothing  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> int:
    disable_ledger()
    from enclave.main import main as enclave_main

    return enclave_main(argv)


if __name__ == "__main__":
    sys.exit(main())
