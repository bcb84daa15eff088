"""One usage record as the ledger keeps it: made from an InferenceRecord, stored as a row, MAC'd whole.

Times: ``created_at`` is the request's start as a UTC datetime (microseconds); time to first token and duration
are whole milliseconds (``ttft_ms``, ``duration_ms``), integers so that the row MAC covers them exactly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import UTC, datetime
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
        usage = record.usage
        return cls(request_id=record.request_id, created_at=datetime.fromtimestamp(record.started_at, UTC),
                   domain_id=record.domain_id, user_id=record.user_id, pat_id=record.pat_id, model=record.model,
                   backend=record.backend, route=record.route, stream=record.stream, status=record.status,
                   outcome=record.outcome,
                   prompt_tokens=usage.prompt_tokens if usage else 0,
                   completion_tokens=usage.completion_tokens if usage else 0,
                   total_tokens=usage.total_tokens if usage else 0,
                   estimated=usage.estimated if usage else False,
                   ttft_ms=_millis(record.ttft_seconds), duration_ms=_millis(record.duration_seconds) or 0,
                   request_sha256=record.request_sha256, response_sha256=record.response_sha256)

    def mac_fields(self) -> tuple[Any, ...]:
        """What the row MAC covers: every column, the primary key first."""
        return tuple(getattr(self, name) for name in FIELDS)

    def row(self, mac: str) -> dict[str, Any]:
        return {**{name: getattr(self, name) for name in FIELDS}, "mac": mac}

    def to_json(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in FIELDS}
        out["created_at"] = self.created_at.isoformat().replace("+00:00", "Z")
        return out


FIELDS = tuple(f.name for f in dataclasses.fields(UsageEntry))
_TYPES: dict[str, tuple[type, ...]] = {
    "stream": (bool,), "estimated": (bool,), "status": (int,), "prompt_tokens": (int,),
    "completion_tokens": (int,), "total_tokens": (int,), "ttft_ms": (int, type(None)), "duration_ms": (int,),
    "request_sha256": (str, type(None)), "response_sha256": (str, type(None)),
}


def _millis(seconds: float | None) -> int | None:
    return None if seconds is None else max(0, round(seconds * 1000))


def entry_from_row(row: Any) -> UsageEntry:
    """The entry a row holds; ValueError when a column holds a type the ledger never writes (a forgery)."""
    values: dict[str, Any] = {}
    for name in FIELDS:
        value = getattr(row, name)
        if name == "created_at":
            if not isinstance(value, datetime):
                raise ValueError("created_at")
            value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        elif not isinstance(value, _TYPES.get(name, (str,))) or \
                (isinstance(value, bool) and bool not in _TYPES.get(name, ())):
            raise ValueError(name)
        values[name] = value
    return UsageEntry(**values)
