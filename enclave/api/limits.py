"""Limits and budgets over the admin API (enclave.quotas; docs/limits.md).

* the platform (unbound superadmin key): a domain's ceiling, ``/admin/domains/{domain_id}/limits``, and any
  key's limits, ``/admin/pats/{pat_id}/limits``;
* a domain's admins: their members' limits there, ``/domains/{domain_id}/members/{user_id}/limits``, and the
  keys bound to the domain, ``/domains/{domain_id}/pats/{pat_id}/limits``, within the ceiling (which they may
  read at ``GET /domains/{domain_id}/limits``);
* any key: what binds it in a domain and how much of it is used, ``GET /users/me/limits?domain=D`` (without
  ``domain``: the key's own domain, else every domain its owner is a member of).

``PUT`` replaces the subject's limits: per kind a number (0 or more), ``"unlimited"``, or absent/null for the
platform default of the subject's level. ``DELETE`` removes them (the defaults apply again).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, PlainValidator, WithJsonSchema

from enclave.access import (Principal, limits_within_ceiling, may_manage_any_pat_limits, may_manage_domain_ceiling,
                            may_manage_domain_pat_limits, may_manage_member_limits, may_read_domain_ceiling,
                            may_read_own_limits, may_set_limits_of, visible_roles)
from enclave.api.context import AppContext, authenticated, check, decided_domain_id, find_domain, find_user
from enclave.api.schemas import ERROR_RESPONSES, DomainRef, PatId, UserRef
from enclave.errors import ApiError
from enclave.quotas.kinds import KINDS, UNLIMITED, Subject, domain_subject, pat_subject, user_subject
from enclave.store import Domain, Pat, canonical_uuid

platform = APIRouter(prefix="/admin", tags=["limits"], responses=ERROR_RESPONSES)
domain_admin = APIRouter(prefix="/domains/{domain_id}", tags=["limits"], responses=ERROR_RESPONSES)
me = APIRouter(tags=["limits"], responses=ERROR_RESPONSES)

_MAX_LIMIT = 2**62


def _limit_value(value: Any) -> int | str | None:
    """A JSON whole number from 0 to 2**62, exactly ``"unlimited"``, or null; nothing coerced (``true``, ``"5"``
    and ``5.0`` are refused rather than read as limits 1 and 5)."""
    if value is None or value == "unlimited":
        return value
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_LIMIT:
        return value
    raise ValueError(f'a limit is a whole number from 0 to {_MAX_LIMIT}, "unlimited", or null for the default')


Value = Annotated[int | Literal["unlimited"] | None, PlainValidator(_limit_value),
                  WithJsonSchema({"anyOf": [{"type": "integer", "minimum": 0, "maximum": _MAX_LIMIT},
                                            {"const": "unlimited"}, {"type": "null"}]})]


class LimitsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rpm: Value = None
    tpm: Value = None
    concurrent: Value = None
    tokens_per_day: Value = None
    tokens_per_month: Value = None

    def stored(self) -> dict[str, int | None]:
        """As stored: None = the platform default, -1 = unlimited."""
        return {k: UNLIMITED if getattr(self, k) == "unlimited" else getattr(self, k) for k in KINDS}


class SubjectOut(BaseModel):
    level: Literal["pat", "user", "domain"]
    domain_id: str | None
    subject_id: str | None


class LimitsOut(BaseModel):
    subject: SubjectOut
    own: dict[str, int | Literal["unlimited"] | None] = Field(
        description="the subject's own limits (null: the platform default applies)")
    effective: dict[str, int | None] = Field(description="what applies (null: no limit)")
    usage: dict[str, dict[str, Any]] | None = Field(None, description="per limited kind: limit, used, resets")


class MyLimitsOut(BaseModel):
    domain_id: str
    subjects: list[LimitsOut] = Field(description="this key, your user in the domain, the domain")


def _ctx(request: Request) -> AppContext:
    return request.app.state.ctx


def _subject_out(subject: Subject) -> SubjectOut:
    return SubjectOut(level=subject.level, domain_id=subject.domain_id or None, subject_id=subject.subject_id or None)


async def _render(ctx: AppContext, subject: Subject, *, with_usage: bool) -> LimitsOut:
    quotas = ctx.quotas
    if subject in quotas.tampered:
        raise ApiError(503, "These limits failed their integrity check (edited outside the enclave); requests "
                            "they bind are refused until they are set or cleared again.",
                       code="limit_integrity_failure", type="api_error")
    stored = quotas.own.get(subject)
    own = {k: (None if stored is None or stored.values.get(k) is None
               else "unlimited" if stored.values[k] == UNLIMITED else stored.values[k]) for k in KINDS}
    usage = await quotas.usage(subject) if with_usage else None
    return LimitsOut(subject=_subject_out(subject), own=own, effective=quotas.effective(subject).as_dict(),
                     usage=usage)


async def _put(ctx: AppContext, subject: Subject, body: LimitsIn) -> LimitsOut:
    await ctx.quotas.rows.put(subject, body.stored(), ctx.clock())
    await ctx.quotas.refresh()
    return await _render(ctx, subject, with_usage=False)


async def _clear(ctx: AppContext, subject: Subject) -> Response:
    await ctx.quotas.rows.delete(subject)
    await ctx.quotas.refresh()
    return Response(status_code=204)


async def _domain(request: Request, ref: str) -> tuple[str, Domain | None]:
    domain = await find_domain(_ctx(request).store, ref)
    return decided_domain_id(ref, domain), domain


async def _pat(request: Request, pat_id: str) -> Pat | None:
    canonical = canonical_uuid(pat_id)
    return await _ctx(request).store.get_pat(canonical) if canonical else None


def _ceiling_check(ctx: AppContext, principal: Principal, domain: Domain, body: LimitsIn) -> None:
    check(limits_within_ceiling(principal, body.stored(), ctx.quotas.effective(domain_subject(domain.id)).as_dict()))


# ---- the platform: domain ceilings and any key --------------------------------------------------------
async def _ceiling_subject(domain_id: DomainRef, request: Request,
                           principal: Principal = Depends(authenticated)) -> Subject:
    check(may_manage_domain_ceiling(principal))
    _, domain = await _domain(request, domain_id)
    if domain is None:
        raise ApiError(404, "Domain not found.", code="domain_not_found")
    return domain_subject(domain.id)


@platform.get("/domains/{domain_id}/limits", response_model=LimitsOut, summary="A domain's ceiling and its usage")
async def get_domain_limits(request: Request, subject: Subject = Depends(_ceiling_subject)) -> LimitsOut:
    return await _render(_ctx(request), subject, with_usage=True)


@platform.put("/domains/{domain_id}/limits", response_model=LimitsOut, summary="Set a domain's ceiling")
async def set_domain_limits(body: LimitsIn, request: Request,
                            subject: Subject = Depends(_ceiling_subject)) -> LimitsOut:
    return await _put(_ctx(request), subject, body)


@platform.delete("/domains/{domain_id}/limits", status_code=204, summary="Clear a domain's ceiling (defaults apply)")
async def clear_domain_limits(request: Request, subject: Subject = Depends(_ceiling_subject)) -> Response:
    return await _clear(_ctx(request), subject)


async def _any_pat_subject(pat_id: PatId, request: Request, principal: Principal = Depends(authenticated)) -> Subject:
    pat = await _pat(request, pat_id)
    check(may_manage_any_pat_limits(principal, pat))
    assert pat is not None
    return pat_subject(pat.id)


@platform.get("/pats/{pat_id}/limits", response_model=LimitsOut, summary="Any key's limits and usage")
async def get_any_pat_limits(request: Request, subject: Subject = Depends(_any_pat_subject)) -> LimitsOut:
    return await _render(_ctx(request), subject, with_usage=True)


@platform.put("/pats/{pat_id}/limits", response_model=LimitsOut, summary="Set any key's limits")
async def set_any_pat_limits(body: LimitsIn, request: Request, subject: Subject = Depends(_any_pat_subject)
                             ) -> LimitsOut:
    return await _put(_ctx(request), subject, body)


@platform.delete("/pats/{pat_id}/limits", status_code=204, summary="Clear any key's limits")
async def clear_any_pat_limits(request: Request, subject: Subject = Depends(_any_pat_subject)) -> Response:
    return await _clear(_ctx(request), subject)


# ---- a domain's admins: members and domain-bound keys, within the ceiling --------------------------------
@domain_admin.get("/limits", response_model=LimitsOut, summary="The domain's ceiling (read-only for its admins)")
async def read_domain_ceiling(domain_id: DomainRef, request: Request,
                              principal: Principal = Depends(authenticated)) -> LimitsOut:
    decided, domain = await _domain(request, domain_id)
    check(may_read_domain_ceiling(principal, decided, domain))
    assert domain is not None
    return await _render(_ctx(request), domain_subject(domain.id), with_usage=True)


#: What a domain admin's route acts on: who asks, the domain, the subject, and the user the subject belongs to.
Target = tuple[Principal, Domain, Subject, str]


async def _member_subject(domain_id: DomainRef, user_id: UserRef, request: Request,
                          principal: Principal = Depends(authenticated)) -> Target:
    ctx = _ctx(request)
    decided, domain = await _domain(request, domain_id)
    user = await find_user(ctx.store, user_id) if domain is not None else None
    member = await ctx.store.get_member(domain.id, user.id) if domain is not None and user is not None else None
    check(may_manage_member_limits(principal, decided, domain, member is not None))
    assert domain is not None and user is not None
    return principal, domain, user_subject(domain.id, user.id), user.id


async def _domain_pat_subject(domain_id: DomainRef, pat_id: PatId, request: Request,
                              principal: Principal = Depends(authenticated)) -> Target:
    decided, domain = await _domain(request, domain_id)
    pat = await _pat(request, pat_id) if domain is not None else None
    check(may_manage_domain_pat_limits(principal, decided, domain, pat))
    assert domain is not None and pat is not None
    return principal, domain, pat_subject(pat.id), pat.user_id


def _within_ceiling_routes(path: str, target: Any, what: str) -> None:
    """GET, PUT (within the domain's ceiling) and DELETE of one kind of subject the domain's admins manage;
    ``target`` is the dependency deciding access and naming the ``Target``."""

    async def read(request: Request, found=Depends(target)) -> LimitsOut:
        return await _render(_ctx(request), found[2], with_usage=True)

    async def write(body: LimitsIn, request: Request, found=Depends(target)) -> LimitsOut:
        principal, domain, subject, owner = found
        check(may_set_limits_of(principal, owner))
        _ceiling_check(_ctx(request), principal, domain, body)
        return await _put(_ctx(request), subject, body)

    async def clear(request: Request, found=Depends(target)) -> Response:
        principal, _, subject, owner = found
        check(may_set_limits_of(principal, owner))
        return await _clear(_ctx(request), subject)

    name = what.replace(" ", "_").replace("-", "_")
    read.__name__, write.__name__, clear.__name__ = f"get_{name}_limits", f"set_{name}_limits", f"clear_{name}_limits"
    domain_admin.add_api_route(path, read, methods=["GET"], response_model=LimitsOut,
                               summary=f"A {what}'s limits and usage")
    domain_admin.add_api_route(path, write, methods=["PUT"], response_model=LimitsOut,
                               summary=f"Set a {what}'s limits (within the domain's ceiling)")
    domain_admin.add_api_route(path, clear, methods=["DELETE"], status_code=204,
                               summary=f"Clear a {what}'s limits (the defaults apply)")


_within_ceiling_routes("/members/{user_id}/limits", _member_subject, "member")
_within_ceiling_routes("/pats/{pat_id}/limits", _domain_pat_subject, "domain-bound key")


# ---- any key: what binds it ------------------------------------------------------------------------------
@me.get("/users/me/limits", response_model=list[MyLimitsOut],
        summary="The limits binding this key (key, user in the domain, domain) and their usage, per domain")
async def my_limits(request: Request, principal: Principal = Depends(authenticated),
                    domain: str | None = Query(None, max_length=100,
                                               description="domain id or name (default: the key's own domain, "
                                                           "else every domain the key's owner is a member of)")
                    ) -> list[MyLimitsOut]:
    ctx = _ctx(request)
    found: list[Domain] = []
    if domain is not None or principal.pat.domain_id is not None:
        decided, one = await _domain(request, domain or principal.pat.domain_id or "")
        check(may_read_own_limits(principal, decided, one))
        assert one is not None
        found = [one]
    else:
        for domain_id in sorted(visible_roles(principal)):
            one = await ctx.store.get_domain(domain_id)
            if one is not None and may_read_own_limits(principal, domain_id, one):
                found.append(one)
    out = []
    for one in found:
        subjects = ctx.quotas.subjects(principal.pat.id, principal.user.id, one.id)
        out.append(MyLimitsOut(domain_id=one.id, subjects=[await _render(ctx, s, with_usage=True) for s in subjects]))
    return out
