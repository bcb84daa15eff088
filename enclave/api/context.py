"""Per-app state shared by the routers, and the authentication dependency."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from enclave.access import Decision, Principal
from enclave.auth import Authenticator, Clock, LastUsedTracker
from enclave.config import Settings
from enclave.errors import ApiError
from enclave.inference.gateway import Gateway
from enclave.metrics import Metrics
from enclave.quotas import Quotas
from enclave.signer import SignerSource
from enclave.store import Domain, Store, User, canonical_uuid
from enclave.usage import Ledger


@dataclass
class AppContext:
    settings: Settings
    store: Store
    auth: Authenticator
    tracker: LastUsedTracker
    registry: Any
    metrics: Metrics
    clock: Clock
    gateway: Gateway
    signer: SignerSource   # receipts and audit checkpoints (enclave.signer)
    quotas: Quotas         # limits and budgets (enclave.quotas)
    ledger: Ledger         # the usage ledger (enclave.usage): a sink of gateway.recorder
    audit: Any = None      # enclave.audit.AuditTrail (Any: enclave.audit imports this module's users)


def ctx(request: Request) -> AppContext:
    return request.app.state.ctx


bearer_scheme = HTTPBearer(auto_error=False, scheme_name="PAT",
                           description="Personal access token: `Authorization: Bearer cube_pat_...`")


async def authenticated(request: Request,
                        _: HTTPAuthorizationCredentials | None = Security(bearer_scheme)) -> Principal:
    """FastAPI dependency: the Principal of the bearer PAT, or a 401 envelope. Kept on the request's state,
    where the audit trail reads the actor (enclave.audit.middleware)."""
    principal = await request.app.state.ctx.auth.authenticate(request.headers.get("authorization"))
    request.state.principal = principal
    return principal


async def request_principal(request: Request) -> Principal:
    """The request's Principal: the one SizeLimitMiddleware's pre-body check authenticated for this very request
    (bodies are authenticated before they are read), else authenticated now."""
    principal = getattr(request.state, "principal", None)
    if isinstance(principal, Principal):
        return principal
    principal = await request.app.state.ctx.auth.authenticate(request.headers.get("authorization"))
    request.state.principal = principal   # the actor of the audit trail's entry (enclave.audit.middleware)
    return principal


def check(decision: Decision) -> None:
    if not decision.allowed:
        raise ApiError(decision.status, decision.message, code=decision.code, param=decision.param,
                       headers={"x-should-retry": "false"} if decision.status in (401, 403) else None)


async def find_user(store: Store, ref: str) -> User | None:
    """A user by id (any case) or by its unique name."""
    uid = canonical_uuid(ref)
    return await (store.get_user(uid) if uid else store.get_user_by_name(ref))


async def find_domain(store: Store, ref: str) -> Domain | None:
    """A domain by id (any case) or by its unique name."""
    did = canonical_uuid(ref)
    return await (store.get_domain(did) if did else store.get_domain_by_name(ref))


def decided_domain_id(ref: str, domain: Domain | None) -> str:
    """The domain id an access decision is about: the found domain's, else the path's reference as given
    (canonical when it is a UUID), so an unknown domain is judged like a foreign one."""
    return domain.id if domain is not None else canonical_uuid(ref) or ref
