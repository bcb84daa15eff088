"""One usage record as the ledger keeps it: made from an InferenceRecord, stored as a row, MAC'd whole.

Times: ``created_at`` is the request's start as a UTC datetime (microseconds); time to first token and duration
are whole milliseconds (``ttft_ms``, ``duration_ms``), integers so that the row MAC covers them exactly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import UTC, datetime
from collections.abc import Sequence
from typing import Any

from enclave.inference.record import InferenceRecord

#: The row MAC's table name (enclave.row_mac).
TABLE = "usage_records"


@dataclass(frozen=True)
class UsageEntry:
    request_id: str
    created_at: datetime          # the request's start, UTC
    domain_id: str
    user_id: str
    pat_id: str
    model: str
    backend: str
    route: str
    stream: bool
    status: int
    outcome: str
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    estimated: bool               # the backend reported no usage: the counts are the gateway's estimate
    ttft_ms: int | None           # None: no first byte was relayed
    duration_ms: int
    request_sha256: str | None
    response_sha256: str | None

    @classmethod
    def from_record(cls, record: InferenceRecord) -> "UsageEntry":
        return cls(*record_values(record))

    def mac_fields(self) -> tuple[Any, ...]:
        """What the row MAC covers: every column, the primary key first."""
        return tuple(getattr(self, name) for name in FIELDS)


    def to_json(self) -> dict[str, Any]:
        """The record as a usage report lists it: without the bodies' hashes. Those are for the receipt, which
        only the key that made the request gets; to anyone else a hash of a short or templated prompt says
        which of the few possible prompts it was."""
        out = {name: getattr(self, name) for name in FIELDS if name not in _RECEIPT_ONLY}
        out["created_at"] = self.created_at.isoformat().replace("+00:00", "Z")
        return out


FIELDS = tuple(f.name for f in dataclasses.fields(UsageEntry))
_RECEIPT_ONLY = frozenset({"request_sha256", "response_sha256"})
_NONE = type(None)
#: The exact types a column may hold, in FIELDS order (an int where a bool belongs, or the reverse, is refused).
_KINDS: tuple[tuple[type, ...], ...] = tuple({
    "created_at": (datetime,), "stream": (bool,), "estimated": (bool,), "status": (int,), "prompt_tokens": (int,),
    "completion_tokens": (int,), "total_tokens": (int,), "ttft_ms": (int, _NONE), "duration_ms": (int,),
    "request_sha256": (str, _NONE), "response_sha256": (str, _NONE),
}.get(name, (str,)) for name in FIELDS)
_CREATED_AT = FIELDS.index("created_at")
INT32_MAX, INT64_MAX = 2**31 - 1, 2**63 - 1
#: The integer columns and the largest value each holds (enclave.schema: Integer, BigInteger); none is negative.
_INT_LIMITS = tuple((FIELDS.index(name), limit) for name, limit in {
    "status": INT32_MAX, "prompt_tokens": INT64_MAX, "completion_tokens": INT64_MAX, "total_tokens": INT64_MAX,
    "ttft_ms": INT32_MAX, "duration_ms": INT32_MAX}.items())


def _millis(seconds: float | None) -> int | None:
    """Whole milliseconds, within the column (a request longer than 24.8 days is recorded as that long)."""
    return None if seconds is None else min(max(0, round(seconds * 1000)), INT32_MAX)


def check_storable(values: Sequence[Any]) -> None:
    """ValueError when a column value cannot be stored (a count beyond its column): such a row would make the
    whole batch fail, again at every retry, and so stop the ledger."""
    for i, limit in _INT_LIMITS:
        value = values[i]
        if value is not None and not 0 <= value <= limit:
            raise ValueError(f"{FIELDS[i]} out of range")


def record_values(record: InferenceRecord) -> tuple[Any, ...]:
    """A finished record's column values in FIELDS order (what the writer stores and MACs, without building
    a UsageEntry: this runs once per request)."""
    usage = record.usage
    return (record.request_id, datetime.fromtimestamp(record.started_at, UTC), record.domain_id, record.user_id,
            record.pat_id, record.model, record.backend, record.route, record.stream, record.status,
            record.outcome, usage.prompt_tokens if usage else 0, usage.completion_tokens if usage else 0,
            usage.total_tokens if usage else 0, usage.estimated if usage else False, _millis(record.ttft_seconds),
            _millis(record.duration_seconds) or 0, record.request_sha256, record.response_sha256)


def checked_values(values: Sequence[Any]) -> list[Any]:
    """A row's column values (FIELDS order) as the ledger wrote them, created_at as an aware UTC datetime;
    ValueError when a column holds a type the ledger never writes (a forgery)."""
    if len(values) != len(FIELDS):
        raise ValueError("columns")
    out = list(values)
    for i, kinds in enumerate(_KINDS):
        if out[i].__class__ not in kinds:
            raise ValueError(FIELDS[i])
    created = out[_CREATED_AT]
    out[_CREATED_AT] = created.replace(tzinfo=UTC) if created.tzinfo is None else created.astimezone(UTC)
    return out
