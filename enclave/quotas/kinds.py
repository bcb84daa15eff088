"""The limit kinds, the subjects they apply to, their fixed UTC windows and OpenAI's duration form."""

from __future__ import annotations

import calendar
import math
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Literal

#: The limit kinds, in the order refusals are looked for: a spent budget first (retrying does not help).
BUDGETS = ("tokens_per_day", "tokens_per_month")
RATES = ("rpm", "tpm")
KINDS = (*BUDGETS, *RATES, "concurrent")
#: Kinds counted in tokens when a request ends; the others count requests when it is admitted.
TOKEN_KINDS = ("tpm", "tokens_per_day", "tokens_per_month")
#: Stored in a limit column for "explicitly unlimited" (NULL there means: the platform default).
UNLIMITED = -1

Level = Literal["pat", "user", "domain"]
LEVELS: tuple[Level, ...] = ("pat", "user", "domain")


@dataclass(frozen=True)
class LimitSet:
    """One subject's limits, one per kind; None = no limit of that kind."""

    rpm: int | None = None
    tpm: int | None = None
    concurrent: int | None = None
    tokens_per_day: int | None = None
    tokens_per_month: int | None = None

    def get(self, kind: str) -> int | None:
        return getattr(self, kind)

    def any(self) -> bool:
        return any(self.get(kind) is not None for kind in KINDS)

    def as_dict(self) -> dict[str, int | None]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


NO_LIMITS = LimitSet()


@dataclass(frozen=True)
class Subject:
    """Whom a limit binds: a PAT, a user within a domain, or a domain."""

    level: Level
    domain_id: str     # "" for a PAT (its limits follow it wherever it is used)
    subject_id: str    # "" for a domain

    @property
    def key(self) -> str:
        """The counters' name for it (at most 80 characters)."""
        if self.level == "pat":
            return f"pat:{self.subject_id}"
        if self.level == "user":
            return f"user:{self.domain_id}:{self.subject_id}"
        return f"domain:{self.domain_id}"


def pat_subject(pat_id: str) -> Subject:
    return Subject("pat", "", pat_id)


def user_subject(domain_id: str, user_id: str) -> Subject:
    return Subject("user", domain_id, user_id)


def domain_subject(domain_id: str) -> Subject:
    return Subject("domain", domain_id, "")


# ---- windows -----------------------------------------------------------------------------------------------
def window(kind: str, now: datetime) -> tuple[int, int]:
    """(start, end) in UTC epoch seconds of the fixed window ``kind`` counts in at ``now``: the minute (rpm,
    tpm), the calendar day, the calendar month; (0, 0) for concurrency, which has none."""
    now = now.astimezone(UTC)
    if kind in ("rpm", "tpm"):
        start = calendar.timegm(now.replace(second=0, microsecond=0).utctimetuple())
        return start, start + 60
    if kind == "tokens_per_day":
        start = calendar.timegm(now.replace(hour=0, minute=0, second=0, microsecond=0).utctimetuple())
        return start, start + 86400
    if kind == "tokens_per_month":
        first = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        nxt = first.replace(year=first.year + 1, month=1) if first.month == 12 else first.replace(month=first.month + 1)
        return calendar.timegm(first.utctimetuple()), calendar.timegm(nxt.utctimetuple())
    return 0, 0


class Windows:
    """``window`` for every kind at a time given as epoch seconds, cheaply (the hot path asks it per request):
    minutes and days by arithmetic on UTC epoch seconds, the month once per day."""

    def __init__(self) -> None:
        self._day = -1
        self._month = (0, 0)

    def at(self, ts: float, kind: str) -> tuple[int, int]:
        second = int(ts)
        if kind in ("rpm", "tpm"):
            start = second - second % 60
            return start, start + 60
        day = second - second % 86400
        if kind == "tokens_per_day":
            return day, day + 86400
        if kind == "tokens_per_month":
            if day != self._day:
                self._month = window(kind, datetime.fromtimestamp(day, UTC))
                self._day = day
            return self._month
        return 0, 0


def seconds_until(end: int, now: datetime) -> float:
    return max(0.0, end - now.timestamp())


def retry_after(seconds: float) -> str:
    """``Retry-After`` in whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))


def go_duration(seconds: float) -> str:
    """OpenAI's ``x-ratelimit-reset-*`` form (Go's duration): ``120ms``, ``1s``, ``6m0s``, ``1h2m3s``."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    total = math.ceil(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"
