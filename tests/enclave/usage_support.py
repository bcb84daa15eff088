"""What the usage tests share: inference records made to order and a Ledger over a fresh store."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from enclave.inference.record import InferenceRecord
from enclave.inference.usage import Usage
from enclave.store import Store

#: 2026-11-30T12:00:00Z: a fixed time the records of a test start from.
T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC).timestamp()


def made_record(*, domain: str = "d" * 36, user: str = "u" * 36, pat: str = "p" * 36, model: str = "m1",
                started_at: float = T0, usage: Usage | None = Usage(3, 5, 8), stream: bool = False,
                **extra: Any) -> InferenceRecord:
    """A finished InferenceRecord as Recorder.finish leaves it."""
    record = InferenceRecord(domain_id=domain, user_id=user, pat_id=pat, model=model, backend="b1",
                             route="chat/completions", stream=stream, request_id=uuid.uuid4().hex,
                             started_at=started_at)
    record.usage = usage
    record.ttft_seconds = 0.0125
    record.duration_seconds = 0.5004
    for name, value in extra.items():
        setattr(record, name, value)
    return record


async def stored_rows(store_or_engine: Any) -> list[Any]:
    engine = getattr(store_or_engine, "engine", store_or_engine)
    async with engine.connect() as conn:
        return (await conn.execute(sa.text("SELECT * FROM usage_records ORDER BY created_at, request_id"))).all()


async def rename_table(store: Store, old: str, new: str) -> None:
    """Take the table away (the writes fail as against a database that is down for them) or bring it back."""
    async with store.engine.begin() as conn:
        await conn.execute(sa.text(f"ALTER TABLE {old} RENAME TO {new}"))
