"""Admin API: platform (superadmin), domain administration (domain admins) and self-service PATs.

Every route needs a PAT with the ``manage`` scope except ``GET /users/me``. A new PAT never gets more than the
creating PAT has: its scopes must be a subset, and a PAT bound to a domain only creates PATs bound to it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from datetime import datetime, timedelta

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import StreamingResponse

from enclave.access import Principal, Scope, may_manage_domain, may_manage_platform
from enclave.api.context import AppContext, authenticated, check, uuid_param
from enclave.api.schemas import (ERROR_RESPONSES, AdminModelOut, BackendStatusOut, DomainCreate, DomainOut,
                                 DomainUpdate, MemberOut, MembershipSet, MeOut, ModelPull, PatCreate, PatCreated,
                                 PatOut, UserCreate, UserOut, UserUpdate)
from enclave import registry as reg
from enclave.errors import ApiError, bad_request, envelope, forbidden, not_found
from enclave.store import Conflict, Domain, Member, Pat, User
from enclave.tokens import PAT_PREFIX, generate_token

log = logging.getLogger("enclave.admin")

platform = APIRouter(prefix="/admin", tags=["platform admin"], responses=ERROR_RESPONSES)
domain_admin = APIRouter(prefix="/domains/{domain_id}", tags=["domain admin"], responses=ERROR_RESPONSES)
me = APIRouter(prefix="/users/me", tags=["self service"], responses=ERROR_RESPONSES)


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
                  last_used_at=p.last_used_at, state=state)


def _ctx(request: Request) -> AppContext:
    return request.app.state.ctx


def _conflict(e: Conflict, what: str) -> ApiError:
    return ApiError(409, f"{what} already exists.", code="already_exists")


async def _platform_admin(request: Request, principal: Principal = Depends(authenticated)) -> Principal:
    check(may_manage_platform(principal))
    return principal


async def _domain_manager(domain_id: str, request: Request,
                          principal: Principal = Depends(authenticated)) -> Principal:
    uuid_param(domain_id, "domain_id")
    domain = await _ctx(request).store.get_domain(domain_id)
    check(may_manage_domain(principal, domain_id, domain))
    return principal


async def _self_manager(principal: Principal = Depends(authenticated)) -> Principal:
    if not principal.has_scope(Scope.MANAGE):
        raise forbidden("This API key lacks the `manage` scope.", "insufficient_scope")
    return principal


async def _issue_pat(ctx: AppContext, creator: Principal, owner_id: str, body: PatCreate,
                     domain_id: str | None) -> PatCreated:
    scopes = list(dict.fromkeys(str(s) for s in body.scopes))
    missing = [s for s in scopes if not creator.has_scope(s)]
    if missing:
        raise forbidden(f"A new API key cannot have scopes the current key lacks: {', '.join(missing)}.",
                        "insufficient_scope")
    if creator.pat.domain_id is not None:
        if domain_id not in (None, creator.pat.domain_id):
            raise forbidden("This API key is bound to another domain.", "not_a_member")
        domain_id = creator.pat.domain_id
    days = body.expires_in_days or ctx.settings.pat_default_ttl_days
    if days > ctx.settings.pat_max_ttl_days:
        raise bad_request(f"`expires_in_days` may be at most {ctx.settings.pat_max_ttl_days}.",
                          code="expiry_too_long", param="expires_in_days")
    now = ctx.clock()
    token = generate_token()
    pat = await ctx.store.create_pat(user_id=owner_id, name=body.name, token_hash=ctx.auth.hash(token),
                                     last4=token[-4:], scopes=scopes, expires_at=now + timedelta(days=days),
                                     domain_id=domain_id, model_allowlist=body.model_allowlist)
    log.info("issued PAT %s for user %s (domain %s)", pat.id, owner_id, domain_id or "any")
    return PatCreated(**pat_out(pat, now).model_dump(), token=token)


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
@platform.post("/domains", response_model=DomainOut, status_code=201)
async def create_domain(body: DomainCreate, request: Request, _: Principal = Depends(_platform_admin)) -> DomainOut:
    try:
        return domain_out(await _ctx(request).store.create_domain(body.name, model_allowlist=body.model_allowlist))
    except Conflict as e:
        raise _conflict(e, f"A domain named `{body.name}`") from None


@platform.get("/domains", response_model=list[DomainOut])
async def list_domains(request: Request, _: Principal = Depends(_platform_admin)) -> list[DomainOut]:
    return [domain_out(d) for d in await _ctx(request).store.list_domains()]


async def _domain_or_404(request: Request, domain_id: str) -> Domain:
    uuid_param(domain_id, "domain_id")
    domain = await _ctx(request).store.get_domain(domain_id)
    if domain is None:
        raise not_found("Domain", "domain_not_found")
    return domain


@platform.get("/domains/{domain_id}", response_model=DomainOut)
async def get_domain(domain_id: str, request: Request, _: Principal = Depends(_platform_admin)) -> DomainOut:
    return domain_out(await _domain_or_404(request, domain_id))


@platform.patch("/domains/{domain_id}", response_model=DomainOut)
async def update_domain(domain_id: str, body: DomainUpdate, request: Request,
                        _: Principal = Depends(_platform_admin)) -> DomainOut:
    await _domain_or_404(request, domain_id)
    try:
        d = await _ctx(request).store.update_domain(domain_id, name=body.name, model_allowlist=body.model_allowlist,
                                                    clear_allowlist=body.clear_model_allowlist)
    except Conflict as e:
        raise _conflict(e, f"A domain named `{body.name}`") from None
    assert d is not None
    return domain_out(d)


@platform.delete("/domains/{domain_id}", status_code=204, summary="Delete a domain, its memberships and its PATs")
async def delete_domain(domain_id: str, request: Request, _: Principal = Depends(_platform_admin)) -> Response:
    await _domain_or_404(request, domain_id)
    await _ctx(request).store.delete_domain(domain_id)
    return Response(status_code=204)


# ---- platform: users -----------------------------------------------------------------------------------
@platform.post("/users", response_model=UserOut, status_code=201)
async def create_user(body: UserCreate, request: Request, _: Principal = Depends(_platform_admin)) -> UserOut:
    try:
        return user_out(await _ctx(request).store.create_user(body.name, is_superadmin=body.superadmin))
    except Conflict as e:
        raise _conflict(e, f"A user named `{body.name}`") from None


@platform.get("/users", response_model=list[UserOut])
async def list_users(request: Request, _: Principal = Depends(_platform_admin)) -> list[UserOut]:
    return [user_out(u) for u in await _ctx(request).store.list_users()]


async def _user_or_404(request: Request, user_id: str) -> User:
    uuid_param(user_id, "user_id")
    user = await _ctx(request).store.get_user(user_id)
    if user is None:
        raise not_found("User", "user_not_found")
    return user


@platform.get("/users/{user_id}", response_model=UserOut)
async def get_user(user_id: str, request: Request, _: Principal = Depends(_platform_admin)) -> UserOut:
    return user_out(await _user_or_404(request, user_id))


async def _keep_a_superadmin(request: Request, user: User) -> None:
    if user.is_superadmin and await _ctx(request).store.count_superadmins() <= 1:
        raise ApiError(409, "This is the last superadmin; promote another user first.", code="last_superadmin")


@platform.patch("/users/{user_id}", response_model=UserOut)
async def update_user(user_id: str, body: UserUpdate, request: Request,
                      _: Principal = Depends(_platform_admin)) -> UserOut:
    user = await _user_or_404(request, user_id)
    if body.superadmin is False:
        await _keep_a_superadmin(request, user)
    try:
        updated = await _ctx(request).store.update_user(user_id, name=body.name, is_superadmin=body.superadmin)
    except Conflict as e:
        raise _conflict(e, f"A user named `{body.name}`") from None
    assert updated is not None
    return user_out(updated)


@platform.delete("/users/{user_id}", status_code=204, summary="Delete a user, their memberships and PATs")
async def delete_user(user_id: str, request: Request, _: Principal = Depends(_platform_admin)) -> Response:
    user = await _user_or_404(request, user_id)
    await _keep_a_superadmin(request, user)
    await _ctx(request).store.delete_user(user_id)
    return Response(status_code=204)


@platform.get("/users/{user_id}/pats", response_model=list[PatOut])
async def list_user_pats(user_id: str, request: Request, _: Principal = Depends(_platform_admin)) -> list[PatOut]:
    await _user_or_404(request, user_id)
    now = _ctx(request).clock()
    return [pat_out(p, now) for p in await _ctx(request).store.list_pats(user_id=user_id)]


@platform.post("/users/{user_id}/pats", response_model=PatCreated, status_code=201,
               summary="Issue a PAT for a user (valid in every domain the user belongs to); shown once")
async def create_user_pat(user_id: str, body: PatCreate, request: Request,
                          principal: Principal = Depends(_platform_admin)) -> PatCreated:
    await _user_or_404(request, user_id)
    return await _issue_pat(_ctx(request), principal, user_id, body, None)


@platform.delete("/users/{user_id}/pats/{pat_id}", status_code=204)
async def revoke_user_pat(user_id: str, pat_id: str, request: Request,
                          _: Principal = Depends(_platform_admin)) -> Response:
    await _user_or_404(request, user_id)
    await _revoke(request, pat_id, lambda p: p.user_id == user_id)
    return Response(status_code=204)


async def _revoke(request: Request, pat_id: str, allowed) -> None:
    uuid_param(pat_id, "pat_id")
    store = _ctx(request).store
    pat = await store.get_pat(pat_id)
    if pat is None or not allowed(pat):
        raise not_found("API key", "pat_not_found")
    await store.revoke_pat(pat_id, at=_ctx(request).clock())
    log.info("revoked PAT %s", pat_id)


# ---- domain administration -----------------------------------------------------------------------------
@domain_admin.get("/members", response_model=list[MemberOut])
async def list_members(domain_id: str, request: Request,
                       _: Principal = Depends(_domain_manager)) -> list[MemberOut]:
    return [member_out(m) for m in await _ctx(request).store.list_members(domain_id)]


@domain_admin.put("/members/{user_id}", response_model=MemberOut, summary="Add a user to the domain or change the role")
async def set_member(domain_id: str, user_id: str, body: MembershipSet, request: Request,
                     _: Principal = Depends(_domain_manager)) -> MemberOut:
    await _user_or_404(request, user_id)
    return member_out(await _ctx(request).store.set_membership(domain_id, user_id, body.role))


@domain_admin.delete("/members/{user_id}", status_code=204)
async def remove_member(domain_id: str, user_id: str, request: Request,
                        _: Principal = Depends(_domain_manager)) -> Response:
    uuid_param(user_id, "user_id")
    store = _ctx(request).store
    if not await store.remove_membership(domain_id, user_id):
        raise not_found("Member", "member_not_found")
    for pat in await store.list_pats(user_id=user_id, domain_id=domain_id):
        if pat.revoked_at is None:
            await store.revoke_pat(pat.id, at=_ctx(request).clock())
    return Response(status_code=204)


@domain_admin.get("/pats", response_model=list[PatOut], summary="PATs bound to this domain")
async def list_domain_pats(domain_id: str, request: Request, _: Principal = Depends(_domain_manager)) -> list[PatOut]:
    now = _ctx(request).clock()
    return [pat_out(p, now) for p in await _ctx(request).store.list_pats(domain_id=domain_id)]


@domain_admin.post("/members/{user_id}/pats", response_model=PatCreated, status_code=201,
                   summary="Issue a PAT bound to this domain for a member; shown once")
async def create_member_pat(domain_id: str, user_id: str, body: PatCreate, request: Request,
                            principal: Principal = Depends(_domain_manager)) -> PatCreated:
    uuid_param(user_id, "user_id")
    if await _ctx(request).store.get_member(domain_id, user_id) is None:
        raise not_found("Member", "member_not_found")
    return await _issue_pat(_ctx(request), principal, user_id, body, domain_id)


@domain_admin.delete("/pats/{pat_id}", status_code=204)
async def revoke_domain_pat(domain_id: str, pat_id: str, request: Request,
                            _: Principal = Depends(_domain_manager)) -> Response:
    await _revoke(request, pat_id, lambda p: p.domain_id == domain_id)
    return Response(status_code=204)


# ---- self service --------------------------------------------------------------------------------------
@me.get("", response_model=MeOut, summary="Who am I: user, this PAT and domain memberships")
async def whoami(request: Request, principal: Principal = Depends(authenticated)) -> MeOut:
    return MeOut(user=user_out(principal.user), pat=pat_out(principal.pat, _ctx(request).clock()),
                 memberships=dict(principal.roles))


@me.get("/pats", response_model=list[PatOut])
async def list_my_pats(request: Request, principal: Principal = Depends(_self_manager)) -> list[PatOut]:
    now = _ctx(request).clock()
    return [pat_out(p, now) for p in await _ctx(request).store.list_pats(user_id=principal.user.id)]


@me.post("/pats", response_model=PatCreated, status_code=201, summary="Create a PAT for yourself; shown once")
async def create_my_pat(body: PatCreate, request: Request, principal: Principal = Depends(_self_manager)) -> PatCreated:
    return await _issue_pat(_ctx(request), principal, principal.user.id, body, None)


@me.delete("/pats/{pat_id}", status_code=204)
async def revoke_my_pat(pat_id: str, request: Request, principal: Principal = Depends(_self_manager)) -> Response:
    await _revoke(request, pat_id, lambda p: p.user_id == principal.user.id)
    return Response(status_code=204)
