"""Deciding, per inference request, whether its PAT, its user in the domain and the domain are within their
limits, and answering the refusals and ``x-ratelimit-*`` headers the way OpenAI does.

A request is checked after authentication and model access, before the backend call, against every subject
that has a limit of the kind (its own row, else the platform default of its level); the first refusal found,
budgets first, is the answer. Requests per minute and concurrency are counted at admission; tokens (tpm, the
day and month budgets) when the request ends, from ``InferenceRecord.usage``: a request admitted within budget
finishes, the next is refused. What a request took is given back exactly once (``Ticket.release``), from the
recorder's sink when it ends or from the route when it never reached the recorder.

Limit rows are cached in memory and re-read every ``sync_seconds`` (and at once after a change made through
this replica), so a change made through another replica applies here within one sync interval.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from starlette.responses import Response

from enclave.config import LimitValues, QuotaSettings
from enclave.errors import ApiError
from enclave.inference.record import InferenceRecord
from enclave.inference.relay import StreamRelay
from enclave.inference.usage import Usage
from enclave.quotas.counters import Counter, CountersUnavailable, SharedCounters
from enclave.quotas.kinds import (KINDS, LEVELS, TOKEN_KINDS, UNLIMITED, Level, LimitSet, Subject, Windows,
                                  domain_subject, go_duration, pat_subject, retry_after, seconds_until,
                                  user_subject, window)
from enclave.quotas.rows import LimitRows, StoredLimits

log = logging.getLogger("enclave.quotas")

_WHO = {"pat": "this API key", "user": "your user in this domain", "domain": "this domain"}
_KIND_TEXT = {"rpm": "requests per minute (RPM)", "tpm": "tokens per minute (TPM)",
              "concurrent": "requests in flight", "tokens_per_day": "tokens per day",
              "tokens_per_month": "tokens per month"}


def limit_set(values: LimitValues | Mapping[str, int | None]) -> LimitSet:
    get = values.get if isinstance(values, Mapping) else lambda k: getattr(values, k)
    return LimitSet(**{kind: get(kind) for kind in KINDS})


def resolve(own: StoredLimits | None, default: LimitSet) -> LimitSet:
    """A subject's effective limits: its own value per kind, else the level's default; -1 is unlimited."""
    if own is None:
        return default
    out = {}
    for kind in KINDS:
        value = own.values.get(kind)
        value = default.get(kind) if value is None else value
        out[kind] = None if value == UNLIMITED else value
    return LimitSet(**out)


@dataclass(eq=False)
class Ticket:
    """What one admitted request holds: its slots and the token counters to charge when it ends."""

    quotas: "Quotas | None"
    request_id: str
    headers: dict[str, str]
    slots: list[Counter] = field(default_factory=list)
    token_limits: list[tuple[str, str, int]] = field(default_factory=list)   # (subject key, kind, limit)
    released: bool = False
    streaming: bool = False

    def release(self, usage: Usage | None = None) -> None:
        """Free the slots and charge the tokens; only the first call counts."""
        if self.released or self.quotas is None:
            return
        self.released = True
        self.quotas._finished(self, usage)

    def headed(self, response: Response) -> Response:
        """The response with the rate-limit headers; a stream releases from the recorder when it ends."""
        if self.headers:
            response.headers.update(self.headers)
        self.streaming = isinstance(response, StreamRelay)
        return response

    def headed_error(self, error: ApiError) -> ApiError:
        for name, value in self.headers.items():
            error.headers.setdefault(name, value)
        return error

    def settle(self) -> None:
        """The route is done with the request: release, unless a stream still runs (its end releases)."""
        if not self.streaming:
            self.release(None)


NO_TICKET = Ticket(None, "", {})


class Quotas:
    def __init__(self, settings: QuotaSettings, rows: LimitRows, counters: SharedCounters,
                 clock: Callable[[], datetime], *, on_refusal: Callable[[str, str], None] | None = None) -> None:
        self.settings = settings
        self.on_refusal = on_refusal
        self.rows = rows
        self.counters = counters
        self.clock = clock
        self.defaults: dict[Level, LimitSet] = {level: limit_set(getattr(settings.defaults, level))
                                                for level in LEVELS}
        self.own: dict[Subject, StoredLimits] = {}
        self.tampered: set[Subject] = set()
        self._tickets: dict[str, Ticket] = {}
        self._task: asyncio.Task[None] | None = None
        self._idle = True
        self._reading = asyncio.Lock()   # one read of the rows at a time: an older read never lands last
        self._effective: dict[Subject, LimitSet] = {}   # resolved limits, until the rows are read again
        self._windows = Windows()

    # ---- lifecycle ---------------------------------------------------------------------------------------
    async def start(self) -> None:
        await self.refresh()
        await self.counters.heartbeat()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="quota-sync")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        try:
            await self.counters.leave()
        except Exception as e:   # the database is gone: the others reclaim this replica's leases
            log.warning("quota counters: could not give the leases back at shutdown: %s", type(e).__name__)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.counters.sync_seconds)
            try:
                await self.counters.heartbeat()
                await self.counters.sync_all(self.clock().timestamp())
                if not self.counters.single_process:   # SQLite: every change goes through this process
                    await self.refresh()
            except Exception as e:
                log.warning("quota sync failed (retried in %g s): %s", self.counters.sync_seconds, type(e).__name__)

    async def refresh(self) -> None:
        """Re-read the limit rows (MAC-checked)."""
        async with self._reading:
            self.own, self.tampered = await self.rows.load_all()
            self._effective = {}
        self._idle = not self.own and not self.tampered and not any(d.any() for d in self.defaults.values())

    # ---- limits ------------------------------------------------------------------------------------------
    def effective(self, subject: Subject) -> LimitSet:
        found = self._effective.get(subject)
        if found is None:
            found = self._effective[subject] = resolve(self.own.get(subject), self.defaults[subject.level])
        return found

    def subjects(self, pat_id: str, user_id: str, domain_id: str) -> tuple[Subject, Subject, Subject]:
        return pat_subject(pat_id), user_subject(domain_id, user_id), domain_subject(domain_id)

    # ---- admission ---------------------------------------------------------------------------------------
    async def admit(self, record: InferenceRecord) -> Ticket:
        """Take what the request needs from every subject's counters, or raise the refusal (429, or 503 when
        a limit row failed its MAC or the shared counters cannot be reached)."""
        if self._idle:
            return NO_TICKET
        plans: list[tuple[Subject, LimitSet]] = []
        for subject in self.subjects(record.pat_id, record.user_id, record.domain_id):
            if subject in self.tampered:
                raise ApiError(503, f"The limits of {_WHO[subject.level]} failed their integrity check; requests "
                                    "are refused until an administrator sets them again.",
                               code="limit_integrity_failure", type="api_error", headers={"x-should-retry": "false"})
            limits = self.effective(subject)
            if limits.any():
                plans.append((subject, limits))
        if not plans:
            return NO_TICKET
        now = self.clock()
        ts = now.timestamp()
        items: list[tuple[Counter, int]] = []
        wanted: list[tuple[str, Subject, int, int]] = []   # per item: kind, subject, limit, window end
        for kind in KINDS:
            for subject, limits in plans:
                limit = limits.get(kind)
                if limit is not None:
                    start, end = self._windows.at(ts, kind)
                    items.append((self.counters.counter(subject.key, kind, start, end, limit),
                                  0 if kind in TOKEN_KINDS else 1))
                    wanted.append((kind, subject, limit, end))
        try:
            refused = await self.counters.take_all(items)
        except CountersUnavailable:
            raise ApiError(503, "The usage limits cannot be checked right now; try again shortly.",
                           code="limits_unavailable", type="api_error", headers={"Retry-After": "1"}) from None
        if refused is not None:
            kind, subject, limit, end = wanted[refused]
            if self.on_refusal is not None:
                self.on_refusal(kind, subject.level)
            raise self._refusal(kind, subject, limit, end, now, self._headers(items, wanted, ts))
        ticket = Ticket(self, record.request_id, self._headers(items, wanted, ts))
        for (c, _), (kind, subject, limit, _end) in zip(items, wanted):
            if kind == "concurrent":
                ticket.slots.append(c)
            elif kind in TOKEN_KINDS:
                ticket.token_limits.append((subject.key, kind, limit))
        self._tickets[record.request_id] = ticket
        return ticket

    def _finished(self, ticket: Ticket, usage: Usage | None) -> None:
        self._tickets.pop(ticket.request_id, None)
        for c in ticket.slots:
            self.counters.give_back(c, 1)
        tokens = usage.total_tokens if usage is not None else 0
        if tokens > 0 and ticket.token_limits:
            ts = self.clock().timestamp()
            for subject_key, kind, limit in ticket.token_limits:
                start, end = self._windows.at(ts, kind)
                self.counters.consume(self.counters.counter(subject_key, kind, start, end, limit), tokens)

    def sink(self, record: InferenceRecord) -> None:
        """The recorder's sink: a request ended (completed, failed, refused upstream or left by its client)."""
        ticket = self._tickets.get(record.request_id)
        if ticket is not None:
            ticket.release(record.usage)

    @property
    def open_tickets(self) -> int:
        return len(self._tickets)

    # ---- answers -----------------------------------------------------------------------------------------
    @staticmethod
    def _headers(items: list[tuple[Counter, int]], wanted: list[tuple[str, Subject, int, int]],
                 ts: float) -> dict[str, str]:
        """OpenAI's rate-limit headers: per rpm and tpm, the subject with the least left."""
        tightest: dict[str, tuple[int, int, int]] = {}
        for (c, _), (kind, _subject, limit, end) in zip(items, wanted):
            if kind == "rpm" or kind == "tpm":
                remaining = max(0, limit - c.used)
                best = tightest.get(kind)
                if best is None or remaining < best[1]:
                    tightest[kind] = (limit, remaining, end)
        headers: dict[str, str] = {}
        for kind, name in (("rpm", "requests"), ("tpm", "tokens")):
            found = tightest.get(kind)
            if found is not None:
                limit, remaining, end = found
                headers[f"x-ratelimit-limit-{name}"] = str(limit)
                headers[f"x-ratelimit-remaining-{name}"] = str(remaining)
                headers[f"x-ratelimit-reset-{name}"] = go_duration(max(0.0, end - ts))
        return headers

    def _refusal(self, kind: str, subject: Subject, limit: int, end: int, now: datetime,
                 headers: dict[str, str]) -> ApiError:
        who, what = _WHO[subject.level], _KIND_TEXT[kind]
        wait = seconds_until(end, now)
        if kind in ("tokens_per_day", "tokens_per_month"):
            resets = datetime.fromtimestamp(end, UTC).isoformat().replace("+00:00", "Z")
            return ApiError(429, f"You exceeded the token budget of {who} ({limit} {what}); it renews at {resets}.",
                            code="insufficient_quota", type="insufficient_quota",
                            headers={**headers, "x-should-retry": "false"})
        if kind == "concurrent":
            return ApiError(429, f"Too many requests in flight for {who}: limit {limit}. Retry when one ends.",
                            code="rate_limit_exceeded", type="requests", headers={**headers, "Retry-After": "1"})
        return ApiError(429, f"Rate limit reached for {who} on {what}: limit {limit}. Please try again in "
                             f"{go_duration(wait)}.", code="rate_limit_exceeded",
                        type="requests" if kind == "rpm" else "tokens",
                        headers={**headers, "Retry-After": retry_after(wait)})

    # ---- reading -----------------------------------------------------------------------------------------
    async def usage(self, subject: Subject) -> dict[str, dict[str, Any]]:
        """Per limited kind: the limit, the units used (freshly synced) and when the window resets."""
        if subject in self.tampered:
            raise ApiError(503, "These limits failed their integrity check; set or clear them again.",
                           code="limit_integrity_failure", type="api_error")
        limits = self.effective(subject)
        now = self.clock()
        out: dict[str, dict[str, Any]] = {}
        for kind in KINDS:
            limit = limits.get(kind)
            if limit is None:
                continue
            start, end = window(kind, now)
            c = self.counters.counter(subject.key, kind, start, end, limit)
            try:
                await self.counters.sync_now(c)
            except CountersUnavailable:
                raise ApiError(503, "The usage counters cannot be read right now.", code="limits_unavailable",
                               type="api_error", headers={"Retry-After": "1"}) from None
            entry: dict[str, Any] = {"limit": limit, "used": c.used}
            if end:
                entry["resets_in_seconds"] = round(seconds_until(end, now), 3)
            out[kind] = entry
        return out
