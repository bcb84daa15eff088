"""Per-app state shared by the routers, and the authentication dependency."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from enclave.access import Decision, Principal
from enclave.auth import Authenticator, Clock, LastUsedTracker
from enclave.config import Settings
from enclave.errors import ApiError, bad_request
from enclave.metrics import Metrics
from enclave.store import Store

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@dataclass
class AppContext:
    settings: Settings
    store: Store
    auth: Authenticator
    tracker: LastUsedTracker
    registry: Any
    metrics: Metrics
    clock: Clock


def ctx(request: Request) -> AppContext:
    return request.app.state.ctx


bearer_scheme = HTTPBearer(auto_error=False, scheme_name="PAT",
                           description="Personal access token: `Authorization: Bearer cube_pat_...`")


async def authenticated(request: Request,
                        _: HTTPAuthorizationCredentials | None = Security(bearer_scheme)) -> Principal:
    """FastAPI dependency: the Principal of the bearer PAT, or a 401 envelope."""
    return await request.app.state.ctx.auth.authenticate(request.headers.get("authorization"))


def check(decision: Decision) -> None:
    if not decision.allowed:
        raise ApiError(decision.status, decision.message, code=decision.code,
                       param="model" if decision.code == "model_not_found" else None,
                       headers={"x-should-retry": "false"} if decision.status in (401, 403) else None)


def uuid_param(value: str, name: str) -> str:
    """Ids are canonical lowercase UUIDs; anything else is a 400 naming the parameter."""
    if not _UUID.fullmatch(value):
        raise bad_request(f"`{name}` must be a UUID.", code="invalid_id", param=name)
    return value
