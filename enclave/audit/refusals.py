"""Authentication refusals, counted in memory and written as a bounded number of entries.

The rule: per interval (``audit.refusal_interval_seconds``) at most one entry per (refusal class, source
address), holding the count, the first and last time and the count per action; at most
``audit.refusal_max_sources`` distinct sources per interval, the rest counted under source ``"*"``. Classes are
the Authenticator's few reasons and actions a route template (or ``METHOD unmatched``), so an unauthenticated
caller can add at most ``classes x (max_sources + 1)`` entries per interval however fast it sends. Only the
class is kept, never the token or any part of it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

OTHER = "*"
MAX_ACTIONS = 200


@dataclass
class _Bucket:
    count: int
    first: datetime
    last: datetime
    actions: dict[str, int] = field(default_factory=dict)


class RefusalCounter:
    def __init__(self, *, max_sources: int) -> None:
        self._max_sources = max_sources
        self._buckets: dict[tuple[str, str], _Bucket] = {}
        self._sources: set[str] = set()

    def count(self, refusal_class: str, source: str, action: str, when: datetime) -> None:
        if source not in self._sources:
            if len(self._sources) >= self._max_sources:
                source = OTHER
            else:
                self._sources.add(source)
        bucket = self._buckets.get((refusal_class, source))
        if bucket is None:
            bucket = self._buckets[(refusal_class, source)] = _Bucket(0, when, when)
        bucket.count += 1
        bucket.last = when
        if action not in bucket.actions and len(bucket.actions) >= MAX_ACTIONS:
            action = OTHER
        bucket.actions[action] = bucket.actions.get(action, 0) + 1

    @property
    def pending(self) -> int:
        return len(self._buckets)

    def drain(self, iso: Callable[[datetime], str]) -> list[dict[str, Any]]:
        """The interval's entries' fields (sorted, so the order is stable), and a fresh interval."""
        buckets, self._buckets, self._sources = self._buckets, {}, set()
        return [{"class": cls, "source": source, "count": b.count, "first": iso(b.first), "last": iso(b.last),
                 "actions": dict(sorted(b.actions.items()))}
                for (cls, source), b in sorted(buckets.items())]

    def restore(self, entries: list[dict[str, Any]], parse: Callable[[str], datetime]) -> None:
        """Put drained counts back (their write failed), merged into the current interval."""
        for e in entries:
            key = (e["class"], e["source"])
            bucket = self._buckets.setdefault(key, _Bucket(0, parse(e["first"]), parse(e["last"])))
            bucket.count += e["count"]
            for action, n in e["actions"].items():
                bucket.actions[action] = bucket.actions.get(action, 0) + n
            if e["source"] != OTHER:
                self._sources.add(e["source"])
