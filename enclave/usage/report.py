"""Usage reports: the records a filter selects, totalled and grouped by model, user, key, domain or day.

Aggregation happens here, in Python, not in SQL: a row counts only once its MAC is checked, and a GROUP BY in
the database would sum rows the host may have edited. The rows are streamed (never all in memory): the memory a
report takes is that of its groups (and of the ``limit`` records an ungrouped listing returns), its time that of
reading every selected row once. The time range and filters are applied in SQL on the indexed columns; a row the
host edited so that a filter no longer selects it is missed like a deleted one (per-row MACs cannot show a
missing row), and wherever it is selected its MAC fails: it is left out and counted in ``integrity_failures``;
so is a row the database selects whose own (verified) values the filter does not select (``UsageFilter.matches``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from enclave.schema import usage_records

if TYPE_CHECKING:   # pragma: no cover
    from enclave.usage.entry import UsageEntry
    from enclave.usage.ledger import Ledger

#: group_by value -> the field naming the group in a result object.
GROUP_KEYS = {"model": "model", "user": "user_id", "pat": "pat_id", "domain": "domain_id", "day": "day"}


@dataclass(frozen=True)
class UsageFilter:
    """Which records a report covers: created in [since, until) (either open), and matching every id set."""
    since: datetime | None = None
    until: datetime | None = None
    domain_id: str | None = None
    user_id: str | None = None
    pat_id: str | None = None
    model: str | None = None

    def clauses(self) -> list[Any]:
        c = usage_records.c
        out: list[Any] = []
        if self.since is not None:
            out.append(c.created_at >= self.since)
        if self.until is not None:
            out.append(c.created_at < self.until)
        for name in ("domain_id", "user_id", "pat_id", "model"):
            value = getattr(self, name)
            if value is not None:
                out.append(c[name] == value)
        return out

    def matches(self, entry: "UsageEntry") -> bool:
        """Whether a verified entry is one the filter selects (``clauses`` asks the database, which is the host's)."""
        if self.since is not None and entry.created_at < self.since:
            return False
        if self.until is not None and entry.created_at >= self.until:
            return False
        return all(getattr(self, name) is None or getattr(entry, name) == getattr(self, name)
                   for name in ("domain_id", "user_id", "pat_id", "model"))


@dataclass
class Totals:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    estimated_requests: int = 0

    def add(self, entry: "UsageEntry") -> None:
        self.requests += 1
        self.prompt_tokens += entry.prompt_tokens
        self.completion_tokens += entry.completion_tokens
        self.total_tokens += entry.total_tokens
        self.estimated_requests += entry.estimated

    def to_json(self) -> dict[str, int]:
        return {"requests": self.requests, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "total_tokens": self.total_tokens,
                "estimated_requests": self.estimated_requests}


@dataclass
class UsageReport:
    totals: Totals = field(default_factory=Totals)
    groups: list[dict[str, Any]] | None = None       # when grouped: one object per group, sorted by its key
    entries: list["UsageEntry"] = field(default_factory=list)   # when not: the newest ``limit`` records
    has_more: bool = False
    integrity_failures: int = 0


def group_key(entry: "UsageEntry", group_by: Sequence[str]) -> tuple[str, ...]:
    return tuple(entry.created_at.date().isoformat() if g == "day" else getattr(entry, GROUP_KEYS[g])
                 for g in group_by)


async def report(ledger: "Ledger", where: UsageFilter, *, group_by: Sequence[str] = (), limit: int = 100
                 ) -> UsageReport:
    """The report over every record ``where`` selects, this process's buffer written first (so a report made
    right after a request counts it; other replicas' last ``flush_seconds`` may be missing)."""
    unknown = [g for g in group_by if g not in GROUP_KEYS]
    if unknown:
        raise ValueError(f"unknown group_by {unknown}")
    await ledger.flush()
    out = UsageReport()
    groups: dict[tuple[str, ...], Totals] = {}
    async for entry in ledger.scan(where):
        if entry is None:
            out.integrity_failures += 1
            continue
        out.totals.add(entry)
        if group_by:
            groups.setdefault(group_key(entry, group_by), Totals()).add(entry)
        elif len(out.entries) < limit:
            out.entries.append(entry)
        else:
            out.has_more = True
    if group_by:
        out.groups = [{**{GROUP_KEYS[g]: k for g, k in zip(group_by, key)}, **totals.to_json()}
                      for key, totals in sorted(groups.items())]
    return out
