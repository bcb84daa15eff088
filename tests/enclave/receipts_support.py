"""A stand-in for the usage ledger (``ctx.ledger``) as receipts read it, for the receipt tests.

The real ledger (``enclave.usage``) is a Recorder sink too, with the same ``find``; until it is on this branch the
tests install this one. It keeps the entries in memory, as the real one does before it writes them.
"""

from __future__ import annotations

import copy
import threading
from datetime import datetime, timezone
from typing import Any

from enclave.inference.record import InferenceRecord


class Entry:
    """A finished request's record as the ledger would return it: its fields, and ``created_at``."""

    def __init__(self, record: InferenceRecord) -> None:
        self._record = copy.copy(record)
        self.created_at = datetime.fromtimestamp(record.started_at, timezone.utc)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._record, name)


class MemoryLedger:
    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}
        self._lock = threading.Lock()

    def record(self, rec: InferenceRecord) -> None:
        with self._lock:
            self.entries[rec.request_id] = Entry(rec)

    async def find(self, request_id: str) -> Entry | None:
        with self._lock:
            return self.entries.get(request_id)


def install_ledger(ctx: Any) -> MemoryLedger:
    """Put a MemoryLedger on the app's context (``ctx.ledger``) and subscribe it to the inference records."""
    ledger = MemoryLedger()
    ctx.ledger = ledger
    ctx.gateway.recorder.sinks.append(ledger.record)
    return ledger
