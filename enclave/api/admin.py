"""Admin API: platform (superadmin), domain administration (domain admins), self-service PATs and keys by id.

Every route needs a PAT with the ``manage`` scope except ``GET /users/me``; who may do what is decided in
``enclave.access`` (one function per action), the handlers only call it. Users and domains in paths are ids
(any case) or unique names.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import StreamingResponse

from enclave.access import (Principal, bound_new_pat, is_own_key_in_binding, issuer_still_holds, may_issue_pat,
                            may_manage_domain, may_manage_own_keys, may_manage_platform, may_revoke_pat,
                            may_set_member, may_view_pat, may_view_self, visible_roles)
from enclave.api.context import AppContext, authenticated, check, decided_domain_id, find_domain, find_user
from enclave.api.schemas import (CONFLICT_RESPONSE, ERROR_RESPONSES, AdminModelOut, BackendStatusOut, DomainCreate, DomainOut,
                                 DomainRef, DomainUpdate, MemberOut, MembershipSet, MeOut, ModelPull, PatCreate,
                                 PatCreated, PatId, PatOut, UserCreate, UserOut, UserRef, UserUpdate)
from enclave import registry as reg
from enclave.errors import ApiError, envelope, not_found
from enclave.store import Conflict, Domain, Member, Pat, User, canonical_uuid
from enclave.tokens import PAT_PREFIX, generate_token

log = logging.getLogger("enclave.admin")

platform = APIRouter(prefix="/admin", tags=["platform admin"], responses=ERROR_RESPONSES)
domain_admin = APIRouter(prefix="/domains/{domain_id}", tags=["domain admin"], responses=ERROR_RESPONSES)
# Self service (/users/me...) and keys by id (/pats/{id}) share one router, so the app includes it as before.
me = APIRouter(tags=["self service"], responses=ERROR_RESPONSES)


# ---- rendering -------------------------------------------------------------------------------------------
def user_out(u: User) -> UserOut:
    return UserOut(id=u.id, name=u.name, superadmin=u.is_superadmin, created_at=u.created_at)


def domain_out(d: Domain) -> DomainOut:
    return DomainOut(id=d.id, name=d.name, created_at=d.created_at,
                     model_allowlist=list(d.model_allowlist) if d.model_allowlist is not None else None)


def member_out(m: Member) -> MemberOut:
    return MemberOut(domain_id=m.domain_id, user=user_out(m.user), role=m.role, created_at=m.created_at)


def pat_out(p: Pat, now: datetime) -> PatOut:
    state = "revoked" if p.revoked_at else ("expired" if now >= p.expires_at else "active")
    return PatOut(id=p.id, user_id=p.user_id, domain_id=p.domain_id, name=p.name,
                  display=f"{PAT_PREFIX}...{p.last4}", scopes=list(p.scopes),
                  model_allowlist=list(p.model_allowlist) if p.model_allowlist is not None else None,
                  created_at=p.created_at, expires_at=p.expires_at, revoked_at=p.revoked_at,
                  last_used_at=p.last_used_at, state=state, issued_by=p.issued_by)


def _ctx(request: Request) -> AppContext:
    return request.app.state.ctx


def _conflict(e: Conflict, what: str) -> ApiError:
    return ApiError(409, f"{what} already exists.", code="already_exists")


@dataclass(frozen=True)
class DomainManager:
    """The caller of a domain-admin route, with the domain its path names."""
    principal: Principal
    domain: Domain


async def _platform_admin(principal: Principal = Depends(authenticated)) -> Principal:
    check(may_manage_platform(principal))
    return principal


async def _domain_manager(domain_id: DomainRef, request: Request,
                          principal: Principal = Depends(authenticated)) -> DomainManager:
    domain = await find_domain(_ctx(request).store, domain_id)
    check(may_manage_domain(principal, decided_domain_id(domain_id, domain), domain))
    assert domain is not None
    return DomainManager(principal, domain)


async def _self_manager(principal: Principal = Depends(authenticated)) -> Principal:
    check(may_manage_own_keys(principal))
    return principal


async def _issue_pat(ctx: AppContext, creator: Principal, owner: User | None, body: PatCreate,
                     domain: Domain | None) -> PatCreated:
    """Mint a key for ``owner`` (bound to ``domain`` when given), once ``enclave.access`` has admitted the
    minter and bounded the key by the creating one."""
    role = (await ctx.store.roles_of(owner.id)).get(domain.id) if domain and owner else None
    check(may_issue_pat(creator, owner, domain.id if domain else None, domain, role))
    assert owner is not None
    now = ctx.clock()
    bounds = bound_new_pat(creator, scopes=[str(s) for s in body.scopes], domain_id=domain.id if domain else None,
                           expires_in_days=body.expires_in_days, model_allowlist=body.model_allowlist, now=now,
                           default_days=ctx.settings.pat_default_ttl_days, max_days=ctx.settings.pat_max_ttl_days)
    check(bounds)
    terms = bounds.terms
    assert terms is not None
    token = generate_token()
    pat = await ctx.store.create_pat(user_id=owner.id, name=body.name, token_hash=ctx.auth.hash(token),
                                     last4=token[-4:], scopes=terms.scopes, expires_at=terms.expires_at,
                                     domain_id=terms.domain_id, model_allowlist=terms.model_allowlist,
                                     issued_by=terms.issued_by)
    log.info("issued PAT %s for user %s (domain %s) with a key of %s issued by %s", pat.id, owner.id,
             terms.domain_id or "any", creator.user.id, terms.issued_by or "a deleted user")
    return PatCreated(**pat_out(pat, now).model_dump(), token=token)


async def _revoke_what_the_issuer_lost(request: Request, issuer_id: str, *, deleting: bool = False) -> None:
    """After a change to ``issuer_id`` (role, membership, superadmin flag; ``deleting``: it is about to go),
    revoke the keys it minted for others that it could no longer mint (``access.issuer_still_holds``)."""
    store = _ctx(request).store
    issuer = None if deleting else await store.get_user(issuer_id)
    roles = await store.roles_of(issuer_id) if issuer is not None else {}
    now = _ctx(request).clock()
    for pat in await store.list_issued_for_others(issuer_id):
        if pat.revoked_at is None and not issuer_still_holds(pat, issuer, roles):
            await store.revoke_pat(pat.id, at=now)
            log.info("revoked PAT %s: its issuer %s can no longer mint it", pat.id, issuer_id)


# ---- platform: backends and models ---------------------------------------------------------------------
@platform.get("/backends", response_model=list[BackendStatusOut], summary="Backends and their health")
async def list_backends(request: Request, _: Principal = Depends(_platform_admin)) -> list[BackendStatusOut]:
    return [BackendStatusOut(name=s.name, kind=s.kind, up=s.up, error=s.error, last_ok=s.last_ok, models=s.models)
            for s in _ctx(request).registry.status()]


@platform.get("/models", response_model=list[AdminModelOut], summary="Every routable model with its backend")
async def list_all_models(request: Request, _: Principal = Depends(_platform_admin)) -> list[AdminModelOut]:
    return [AdminModelOut(**card.to_openai(), backend=card.backend, kind=card.kind)
            for card in _ctx(request).registry.models()]


def _registry_error(exc: Exception) -> ApiError:
    if isinstance(exc, reg.UnknownBackend):
        return ApiError(404, str(exc) or "Unknown backend.", code="backend_not_found", param="backend")
    if isinstance(exc, reg.UnsupportedOperation):
        return ApiError(400, str(exc) or "The backend does not support this operation.",
                        code="unsupported_operation", param="backend")
    if isinstance(exc, reg.InvalidModelName):
        return ApiError(400, str(exc), code="invalid_model_name", param="model")
    if isinstance(exc, reg.ModelNotFound):
        return ApiError(404, str(exc) or "Model not found.", code="model_not_found", param="model")
    if isinstance(exc, reg.PullError):
        return ApiError(502, exc.message, code="pull_failed", type="api_error", param="model")
    if isinstance(exc, reg.BackendUnavailable):
        return ApiError(503, str(exc) or "The backend is not answering.", code="backend_unavailable",
                        type="api_error")
    return ApiError(502, "The backend refused the operation.", code="backend_error", type="api_error")


@platform.post("/models", summary="Add (pull) a model on an Ollama backend; streams NDJSON progress",
               responses={200: {"content": {"application/x-ndjson": {}},
                                "description": "one JSON object per line (Ollama pull progress); a final "
                                               "{\"error\": {...}} line if the pull fails midway"}})
async def pull_model(body: ModelPull, request: Request,
                     _: Principal = Depends(_platform_admin)) -> StreamingResponse:
    try:
        stream = _ctx(request).registry.pull(body.backend, body.model)
        first = await stream.__anext__()
    except StopAsyncIteration:
        first = None
    except reg.RegistryError as e:
        raise _registry_error(e) from None
    log.info("pulling model %s on backend %s", body.model, body.backend)

    async def lines() -> AsyncIterator[bytes]:
        if first is not None:
            yield json.dumps(first).encode() + b"\n"
        try:
            async for item in stream:
                yield json.dumps(item).encode() + b"\n"
        except reg.RegistryError as e:
            err = _registry_error(e)
            yield json.dumps(envelope(err.message, type=err.type, code=err.code, param=err.param)).encode() + b"\n"

    return StreamingResponse(lines(), media_type="application/x-ndjson")


@platform.delete("/models/{model:path}", status_code=204, summary="Remove a model from its backend")
async def remove_model(model: str, request: Request, backend: str | None = Query(None, max_length=100),
                       _: Principal = Depends(_platform_admin)) -> Response:
    try:
        await _ctx(request).registry.remove(model, backend)
    except reg.RegistryError as e:
        raise _registry_error(e) from None
    log.info("removed model %s (backend %s)", model, backend or "routed")
    return Response(status_code=204)


# ---- platform: domains ---------------------------------------------------------------------------------
@platform.post("/domains", response_model=DomainOut, status_code=201, responses=CONFLICT_RESPONSE)
async def create_domain(body: DomainCreate, request: Request, _: Principal = Depends(_platform_admin)) -> DomainOut:
    try:
        return domain_out(await _ctx(request).store.create_domain(body.name, model_allowlist=body.model_allowlist))
    except Conflict as e:
        raise _conflict(e, f"A domain named `{body.name}`") from None


@platform.get("/domains", response_model=list[DomainOut])
async def list_domains(request: Request, _: Principal = Depends(_platform_admin)) -> list[DomainOut]:
    return [domain_out(d) for d in await _ctx(request).store.list_domains()]


async def _domain_or_404(request: Request, ref: str) -> Domain:
    domain = await find_domain(_ctx(request).store, ref)
    if domain is None:
        raise not_found("Domain", "domain_not_found")
    return domain


@platform.get("/domains/{domain_id}", response_model=DomainOut)
async def get_domain(domain_id: DomainRef, request: Request, _: Principal = Depends(_platform_admin)) -> DomainOut:
    return domain_out(await _domain_or_404(request, domain_id))


@platform.patch("/domains/{domain_id}", response_model=DomainOut, responses=CONFLICT_RESPONSE)
async def update_domain(domain_id: DomainRef, body: DomainUpdate, request: Request,
                        _: Principal = Depends(_platform_admin)) -> DomainOut:
    domain = await _domain_or_404(request, domain_id)
    try:
        d = await _ctx(request).store.update_domain(domain.id, name=body.name, model_allowlist=body.model_allowlist,
                                                    clear_allowlist=body.clear_model_allowlist)
    except Conflict as e:
        raise _conflict(e, f"A domain named `{body.name}`") from None
    assert d is not None
    return domain_out(d)


@platform.delete("/domains/{domain_id}", status_code=204, summary="Delete a domain, its memberships and its PATs")
async def delete_domain(domain_id: DomainRef, request: Request, _: Principal = Depends(_platform_admin)) -> Response:
    domain = await _domain_or_404(request, domain_id)
    await _ctx(request).store.delete_domain(domain.id)
    return Response(status_code=204)


# ---- platform: users -----------------------------------------------------------------------------------
@platform.post("/users", response_model=UserOut, status_code=201, responses=CONFLICT_RESPONSE)
async def create_user(body: UserCreate, request: Request, _: Principal = Depends(_platform_admin)) -> UserOut:
    try:
        return user_out(await _ctx(request).store.create_user(body.name, is_superadmin=body.superadmin))
    except Conflict as e:
        raise _conflict(e, f"A user named `{body.name}`") from None


@platform.get("/users", response_model=list[UserOut])
async def list_users(request: Request, _: Principal = Depends(_platform_admin)) -> list[UserOut]:
    return [user_out(u) for u in await _ctx(request).store.list_users()]


async def _user_or_404(request: Request, ref: str) -> User:
    user = await find_user(_ctx(request).store, ref)
    if user is None:
        raise not_found("User", "user_not_found")
    return user


@platform.get("/users/{user_id}", response_model=UserOut)
async def get_user(user_id: UserRef, request: Request, _: Principal = Depends(_platform_admin)) -> UserOut:
    return user_out(await _user_or_404(request, user_id))


async def _keep_a_superadmin(request: Request, user: User) -> None:
    if user.is_superadmin and await _ctx(request).store.count_superadmins() <= 1:
        raise ApiError(409, "This is the last superadmin; promote another user first.", code="last_superadmin")


@platform.patch("/users/{user_id}", response_model=UserOut, responses=CONFLICT_RESPONSE)
async def update_user(user_id: UserRef, body: UserUpdate, request: Request,
                      _: Principal = Depends(_platform_admin)) -> UserOut:
    user = await _user_or_404(request, user_id)
    if body.superadmin is False:
        await _keep_a_superadmin(request, user)
    try:
        updated = await _ctx(request).store.update_user(user.id, name=body.name, is_superadmin=body.superadmin)
    except Conflict as e:
        raise _conflict(e, f"A user named `{body.name}`") from None
    assert updated is not None
    await _revoke_what_the_issuer_lost(request, user.id)
    return user_out(updated)


@platform.delete("/users/{user_id}", status_code=204, responses=CONFLICT_RESPONSE, summary="Delete a user, their memberships and PATs")
async def delete_user(user_id: UserRef, request: Request, _: Principal = Depends(_platform_admin)) -> Response:
    user = await _user_or_404(request, user_id)
    await _keep_a_superadmin(request, user)
    await _revoke_what_the_issuer_lost(request, user.id, deleting=True)
    await _ctx(request).store.delete_user(user.id)
    return Response(status_code=204)


@platform.get("/users/{user_id}/pats", response_model=list[PatOut])
async def list_user_pats(user_id: UserRef, request: Request, _: Principal = Depends(_platform_admin)) -> list[PatOut]:
    user = await _user_or_404(request, user_id)
    now = _ctx(request).clock()
    return [pat_out(p, now) for p in await _ctx(request).store.list_pats(user_id=user.id)]


@platform.post("/users/{user_id}/pats", response_model=PatCreated, status_code=201,
               summary="Issue a PAT for a user (valid in every domain the user belongs to); shown once")
async def create_user_pat(user_id: UserRef, body: PatCreate, request: Request,
                          principal: Principal = Depends(_platform_admin)) -> PatCreated:
    user = await _user_or_404(request, user_id)
    return await _issue_pat(_ctx(request), principal, user, body, None)


@platform.delete("/users/{user_id}/pats/{pat_id}", status_code=204)
async def revoke_user_pat(user_id: UserRef, pat_id: PatId, request: Request,
                          principal: Principal = Depends(_platform_admin)) -> Response:
    user = await _user_or_404(request, user_id)
    await _revoke(request, principal, pat_id, lambda p: p.user_id == user.id)
    return Response(status_code=204)


async def _pat_for(request: Request, principal: Principal, pat_id: str, decide, within=None) -> Pat:
    """The key ``pat_id`` names, once ``decide`` (an ``enclave.access`` rule) admits the principal; a key outside
    the route's reach (``within``) or not visible to the caller is a 404 like an unknown one."""
    store = _ctx(request).store
    canonical = canonical_uuid(pat_id)
    pat = await store.get_pat(canonical) if canonical else None
    if pat is not None and within is not None and not within(pat):
        pat = None
    domain = await store.get_domain(pat.domain_id) if pat is not None and pat.domain_id else None
    check(decide(principal, pat, domain))
    assert pat is not None
    return pat


async def _revoke(request: Request, principal: Principal, pat_id: str, within=None) -> None:
    pat = await _pat_for(request, principal, pat_id, may_revoke_pat, within)
    await _ctx(request).store.revoke_pat(pat.id, at=_ctx(request).clock())
    log.info("revoked PAT %s", pat.id)


# ---- domain administration -----------------------------------------------------------------------------
@domain_admin.get("/members", response_model=list[MemberOut])
async def list_members(request: Request, m: DomainManager = Depends(_domain_manager)) -> list[MemberOut]:
    return [member_out(x) for x in await _ctx(request).store.list_members(m.domain.id)]


@domain_admin.put("/members/{user_id}", response_model=MemberOut, summary="Add a user to the domain or change the role")
async def set_member(user_id: UserRef, body: MembershipSet, request: Request,
                     m: DomainManager = Depends(_domain_manager)) -> MemberOut:
    store = _ctx(request).store
    user = await find_user(store, user_id)
    is_member = user is not None and await store.get_member(m.domain.id, user.id) is not None
    check(may_set_member(m.principal, m.domain.id, m.domain, user, named_by_id=canonical_uuid(user_id) is not None,
                         is_member=is_member))
    assert user is not None
    member = await store.set_membership(m.domain.id, user.id, body.role)
    await _revoke_what_the_issuer_lost(request, user.id)
    return member_out(member)


@domain_admin.delete("/members/{user_id}", status_code=204, summary="Remove a member and revoke their keys bound here")
async def remove_member(user_id: UserRef, request: Request, m: DomainManager = Depends(_domain_manager)) -> Response:
    store = _ctx(request).store
    user = await find_user(store, user_id)
    if user is None or not await store.remove_membership(m.domain.id, user.id):
        raise not_found("Member", "member_not_found")
    for pat in await store.list_pats(user_id=user.id, domain_id=m.domain.id):
        if pat.revoked_at is None:
            await store.revoke_pat(pat.id, at=_ctx(request).clock())
    await _revoke_what_the_issuer_lost(request, user.id)
    return Response(status_code=204)


@domain_admin.get("/pats", response_model=list[PatOut], summary="PATs bound to this domain")
async def list_domain_pats(request: Request, m: DomainManager = Depends(_domain_manager)) -> list[PatOut]:
    now = _ctx(request).clock()
    return [pat_out(p, now) for p in await _ctx(request).store.list_pats(domain_id=m.domain.id)]


@domain_admin.post("/members/{user_id}/pats", response_model=PatCreated, status_code=201,
                   summary="Issue a PAT bound to this domain for a member who is not a superadmin; shown once")
async def create_member_pat(user_id: UserRef, body: PatCreate, request: Request,
                            m: DomainManager = Depends(_domain_manager)) -> PatCreated:
    return await _issue_pat(_ctx(request), m.principal, await find_user(_ctx(request).store, user_id), body,
                            m.domain)


@domain_admin.delete("/pats/{pat_id}", status_code=204)
async def revoke_domain_pat(pat_id: PatId, request: Request, m: DomainManager = Depends(_domain_manager)) -> Response:
    await _revoke(request, m.principal, pat_id, lambda p: p.domain_id == m.domain.id)
    return Response(status_code=204)


# ---- self service --------------------------------------------------------------------------------------
@me.get("/users/me", response_model=MeOut, summary="Who am I: user, this PAT and domain memberships")
async def whoami(request: Request, principal: Principal = Depends(authenticated)) -> MeOut:
    check(may_view_self(principal))
    return MeOut(user=user_out(principal.user), pat=pat_out(principal.pat, _ctx(request).clock()),
                 memberships=visible_roles(principal))


@me.get("/users/me/pats", response_model=list[PatOut],
        summary="Your keys (a domain-bound key sees only your keys bound to its domain)")
async def list_my_pats(request: Request, principal: Principal = Depends(_self_manager)) -> list[PatOut]:
    now = _ctx(request).clock()
    return [pat_out(p, now) for p in await _ctx(request).store.list_pats(user_id=principal.user.id)
            if is_own_key_in_binding(principal, p)]


@me.post("/users/me/pats", response_model=PatCreated, status_code=201,
         summary="Create a PAT for yourself, within this key's bounds; shown once")
async def create_my_pat(body: PatCreate, request: Request, principal: Principal = Depends(_self_manager)) -> PatCreated:
    return await _issue_pat(_ctx(request), principal, principal.user, body, None)


@me.delete("/users/me/pats/{pat_id}", status_code=204)
async def revoke_my_pat(pat_id: PatId, request: Request, principal: Principal = Depends(_self_manager)) -> Response:
    await _revoke(request, principal, pat_id, lambda p: is_own_key_in_binding(principal, p))
    return Response(status_code=204)


# ---- keys by id, wherever the caller may manage them ---------------------------------------------------
@me.get("/pats/{pat_id}", response_model=PatOut, tags=["keys"],
        summary="One key: the owner's (within this key's binding), a domain admin's for keys bound to the "
                "domain, or any for a superadmin; 404 otherwise")
async def get_pat(pat_id: PatId, request: Request, principal: Principal = Depends(authenticated)) -> PatOut:
    return pat_out(await _pat_for(request, principal, pat_id, may_view_pat), _ctx(request).clock())


@me.delete("/pats/{pat_id}", status_code=204, tags=["keys"], summary="Revoke a key wherever the caller may manage it")
async def revoke_pat(pat_id: PatId, request: Request, principal: Principal = Depends(authenticated)) -> Response:
    await _revoke(request, principal, pat_id)
    return Response(status_code=204)
