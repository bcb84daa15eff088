"""Usage reports: the platform's (superadmin), a domain's (its admins) and a user's own.

``GET /admin/usage``, ``GET /domains/{domain_id}/usage``, ``GET /users/me/usage``; who sees what is decided in
``enclave.access`` (``may_read_platform_usage``, ``may_read_domain_usage``, ``may_read_own_usage``), whose scope
is ANDed with the query's filters. Times are RFC 3339 with an offset, or a date (YYYY-MM-DD, UTC midnight); the
range is half-open, [since, until) (empty when until is not after since). Rows failing their MAC are never
counted: ``integrity_failures`` says how many the report left out.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field
from sqlalchemy.exc import SQLAlchemyError

from enclave.access import Principal, UsageScope, may_read_domain_usage, may_read_own_usage, may_read_platform_usage
from enclave.api.context import AppContext, authenticated, check, decided_domain_id, find_domain
from enclave.api.schemas import ERROR_RESPONSES, DomainRef
from enclave.errors import ApiError, bad_request
from enclave.store import canonical_uuid
from enclave.usage import GROUP_KEYS, UsageFilter, UsageReport, report

router = APIRouter(tags=["usage"], responses=ERROR_RESPONSES)

MAX_LIMIT = 10_000
_TIME = re.compile(r"(?P<year>\d{4})-(?P<month>\d{2})-(?P<day>\d{2})"
                   r"(?:[Tt ](?P<hour>\d{2}):(?P<minute>\d{2}):(?P<second>\d{2})(?:\.(?P<fraction>\d+))?"
                   r"(?:[Zz]|(?P<sign>[+-])(?P<off_h>\d{2}):(?P<off_m>\d{2})))?")
_UUID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
_GROUP_PATTERN = r"^(model|user|pat|domain|day)(,(model|user|pat|domain|day))*$"
#: A time parameter's schema: a date or an RFC 3339 time (what ``parse_time`` takes).
_TIME_SCHEMA = {"anyOf": [{"type": "string", "format": "date"}, {"type": "string", "format": "date-time"}]}


class UsageTotalsOut(BaseModel):
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    estimated_requests: int = Field(description="requests whose counts the gateway estimated (the backend "
                                                "reported none)")


class UsageReportOut(BaseModel):
    object: Literal["usage.report"] = "usage.report"
    since: datetime | None
    until: datetime | None
    group_by: list[str]
    totals: UsageTotalsOut
    data: list[dict[str, Any]] = Field(description="with group_by: one object per group (its key fields, e.g. "
                                                   "`model` or `day`, and the totals fields); without: the newest "
                                                   "`limit` records (no content, ever, nor the hashes of the bodies: those are in "
                                                   "the receipt, for the key that made the request)")
    has_more: bool = Field(description="ungrouped: more records matched than `limit`")
    integrity_failures: int = Field(description="rows left out because their MAC failed (edited or inserted "
                                                "outside the enclave)")


Since = Annotated[str | None, Query(max_length=64, json_schema_extra=_TIME_SCHEMA,
                                    description="start, inclusive: an RFC 3339 time or a date (UTC midnight)")]
Until = Annotated[str | None, Query(max_length=64, json_schema_extra=_TIME_SCHEMA,
                                    description="end, exclusive: an RFC 3339 time or a date (UTC midnight)")]
GroupBy = Annotated[list[Annotated[str, Query(pattern=_GROUP_PATTERN, max_length=40)]] | None, Query(
    max_length=5, description="model, user, pat, domain or day; several (repeated or comma-separated) combine")]
IdFilter = Annotated[str | None, Query(pattern=_UUID_PATTERN, description="an id (UUID)")]
ModelFilter = Annotated[str | None, Query(max_length=512, pattern=r"^[^\x00-\x1f\x7f]*$",
                                          description="a model id (no control characters)")]
Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT, description="ungrouped: at most this many records")]


def parse_time(value: str | None, param: str) -> datetime | None:
    """An RFC 3339 time (its offset required; a leap second counts as the next second) or a date (UTC
    midnight), in UTC. Times beyond what a datetime holds are clamped to its range."""
    if value is None:
        return None
    m = _TIME.fullmatch(value)
    if m is None:
        raise bad_request(f"`{param}` is not an RFC 3339 time (with its UTC offset, e.g. Z) or a date (YYYY-MM-DD).",
                          param=param)
    year, month, day = int(m["year"]), int(m["month"]), int(m["day"])
    hour, minute, second = int(m["hour"] or 0), int(m["minute"] or 0), int(m["second"] or 0)
    micros = int((m["fraction"] or "")[:6].ljust(6, "0"))
    offset = 0
    if m["sign"]:
        offset = (int(m["off_h"]) * 60 + int(m["off_m"])) * (1 if m["sign"] == "+" else -1)
    if hour > 23 or minute > 59 or second > 60 or abs(offset) >= 24 * 60:
        raise bad_request(f"`{param}` is not a valid time.", param=param)
    try:
        naive = datetime(year, month, day, hour, minute, min(second, 59), micros)
    except ValueError:
        raise bad_request(f"`{param}` is not a valid date.", param=param) from None
    try:
        return (naive + timedelta(seconds=second - min(second, 59), minutes=-offset)).replace(tzinfo=UTC)
    except OverflowError:
        return (datetime.min if offset > 0 or year < 2 else datetime.max).replace(tzinfo=UTC)


def parse_group_by(values: list[str] | None) -> tuple[str, ...]:
    keys = tuple(k.strip() for v in values or () for k in v.split(",") if k.strip())
    unknown = [k for k in keys if k not in GROUP_KEYS]
    if unknown:
        raise bad_request(f"`group_by` takes {', '.join(GROUP_KEYS)}; not {', '.join(unknown)}.", param="group_by")
    return tuple(dict.fromkeys(keys))   # a key named twice groups once


def _id(value: str | None, param: str) -> str | None:
    if value is None:
        return None
    canonical = canonical_uuid(value)
    if canonical is None:
        raise bad_request(f"`{param}` must be an id (UUID).", param=param)
    return canonical


def _narrowed(scope: UsageScope, asked: str | None, field: str) -> str | None:
    """The filter on ``field``: the scope's (the asked one must then equal it, else the report is empty by
    design: a value outside the scope selects nothing) or the one asked."""
    fixed = getattr(scope, field)
    if fixed is None:
        return asked
    return fixed if asked in (None, fixed) else _NOTHING


_NOTHING = "-"   # an id no record has: a filter outside the caller's scope selects nothing
#: The query parameters each route takes: any other is a 400, so a misspelt filter (``?user=``, ``?domain=``)
#: never silently widens a report to everything the caller may see.
PLATFORM_PARAMS = frozenset({"since", "until", "group_by", "model", "user_id", "pat_id", "domain_id", "limit"})
DOMAIN_PARAMS = PLATFORM_PARAMS - {"domain_id"}
OWN_PARAMS = PLATFORM_PARAMS


def check_known_params(request: Request, known: frozenset[str]) -> None:
    unknown = sorted(set(request.query_params.keys()) - known)
    if unknown:
        raise bad_request(f"Unknown query parameter `{unknown[0][:40]}`; this route takes "
                          f"{', '.join(sorted(known))}.", code="unknown_parameter", param=unknown[0][:40] or None)


async def _report(request: Request, scope: UsageScope, known: frozenset[str], *, since: str | None,
                  until: str | None, group_by: list[str] | None, model: str | None, user_id: str | None,
                  pat_id: str | None, domain_id: str | None, limit: int) -> UsageReportOut:
    check(scope)
    check_known_params(request, known)
    start, end = parse_time(since, "since"), parse_time(until, "until")
    keys = parse_group_by(group_by)
    where = UsageFilter(since=start, until=end, model=model,
                        domain_id=_narrowed(scope, domain_id, "domain_id"),
                        user_id=_narrowed(scope, user_id, "user_id"),
                        pat_id=_narrowed(scope, pat_id, "pat_id"))
    ctx: AppContext = request.app.state.ctx
    try:
        result: UsageReport = await report(ctx.ledger, where, group_by=keys, limit=limit)
    except (SQLAlchemyError, OSError) as e:   # the database is down: the records wait in the buffer
        raise ApiError(503, "The usage database cannot be read right now; try again shortly.",
                       code="usage_unavailable", type="api_error") from e
    data = result.groups if result.groups is not None else [e.to_json() for e in result.entries]
    return UsageReportOut(since=start, until=end, group_by=list(keys), totals=UsageTotalsOut(**result.totals.to_json()),
                          data=data, has_more=result.has_more, integrity_failures=result.integrity_failures)


@router.get("/admin/usage", response_model=UsageReportOut, tags=["platform admin"],
            summary="Usage across the platform (superadmin)")
async def platform_usage(request: Request, since: Since = None, until: Until = None, group_by: GroupBy = None,
                         model: ModelFilter = None, user_id: IdFilter = None, pat_id: IdFilter = None,
                         domain_id: IdFilter = None, limit: Limit = 100,
                         principal: Principal = Depends(authenticated)) -> UsageReportOut:
    return await _report(request, may_read_platform_usage(principal), PLATFORM_PARAMS, since=since, until=until,
                         group_by=group_by, model=model, user_id=_id(user_id, "user_id"),
                         pat_id=_id(pat_id, "pat_id"), domain_id=_id(domain_id, "domain_id"), limit=limit)


@router.get("/domains/{domain_id}/usage", response_model=UsageReportOut, tags=["domain admin"],
            summary="Usage in one domain (its admins)")
async def domain_usage(domain_id: DomainRef, request: Request, since: Since = None, until: Until = None,
                       group_by: GroupBy = None, model: ModelFilter = None, user_id: IdFilter = None,
                       pat_id: IdFilter = None, limit: Limit = 100,
                       principal: Principal = Depends(authenticated)) -> UsageReportOut:
    domain = await find_domain(request.app.state.ctx.store, domain_id)
    scope = may_read_domain_usage(principal, decided_domain_id(domain_id, domain), domain)
    check(scope)
    return await _report(request, scope, DOMAIN_PARAMS, since=since, until=until, group_by=group_by, model=model,
                         user_id=_id(user_id, "user_id"), pat_id=_id(pat_id, "pat_id"), domain_id=None, limit=limit)


@router.get("/users/me/usage", response_model=UsageReportOut, tags=["self service"],
            summary="Your own usage (all your keys' with the manage scope; else this key's)")
async def own_usage(request: Request, since: Since = None, until: Until = None, group_by: GroupBy = None,
                    model: ModelFilter = None, user_id: IdFilter = None, pat_id: IdFilter = None,
                    domain_id: IdFilter = None, limit: Limit = 100,
                    principal: Principal = Depends(authenticated)) -> UsageReportOut:
    user, pat = _id(user_id, "user_id"), _id(pat_id, "pat_id")
    return await _report(request, may_read_own_usage(principal, user_id=user, pat_id=pat), OWN_PARAMS, since=since,
                         until=until, group_by=group_by, model=model, user_id=user, pat_id=pat,
                         domain_id=_id(domain_id, "domain_id"), limit=limit)
