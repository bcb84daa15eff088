"""Request and response bodies of the HTTP API (also the OpenAPI schema)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import Path
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StringConstraints

from enclave.access import Scope
from enclave.config import PAT_TTL_CEILING_DAYS
from enclave.store import canonical_uuid

#: Path parameters that name a user or a domain take either its id (UUID, any case) or its unique name.
DomainRef = Annotated[str, Path(description="domain id (UUID, any case) or unique name", max_length=100)]
UserRef = Annotated[str, Path(description="user id (UUID, any case) or unique name", max_length=100)]
PatId = Annotated[str, Path(description="API key id (UUID, any case)", max_length=100)]


def _not_an_id(name: str) -> str:
    if canonical_uuid(name):
        raise ValueError("a name cannot look like an id (UUID): names and ids are both accepted in paths")
    return name


Name = Annotated[str, StringConstraints(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]*$"),
                 AfterValidator(_not_an_id)]
PatName = Annotated[str, StringConstraints(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._@ -]*$")]
Pattern = Annotated[str, StringConstraints(min_length=1, max_length=300)]
Patterns = Annotated[list[Pattern], Field(max_length=200, description="exact model ids or shell patterns (e.g. llama3*)")]


def _json_number(value: object) -> object:
    """JSON Schema's integer: 30 or 30.0, never ``true`` or ``"30"`` (pydantic's lax mode takes both)."""
    if isinstance(value, (bool, str, bytes)):
        raise ValueError("must be a JSON integer")
    return value


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelObject(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorEnvelope(BaseModel):
    error: ErrorBody


class UserCreate(_Request):
    name: Name
    superadmin: StrictBool = False


class UserUpdate(_Request):
    name: Name | None = None
    superadmin: StrictBool | None = None


class UserOut(BaseModel):
    id: str
    name: str
    superadmin: bool
    created_at: datetime


class DomainCreate(_Request):
    name: Name
    model_allowlist: Patterns | None = None


class DomainUpdate(_Request):
    name: Name | None = None
    model_allowlist: Patterns | None = None
    clear_model_allowlist: StrictBool = False


class DomainOut(BaseModel):
    id: str
    name: str
    model_allowlist: list[str] | None
    created_at: datetime


class MembershipSet(_Request):
    role: Literal["admin", "member"] = "member"


class MemberOut(BaseModel):
    domain_id: str
    user: UserOut
    role: Literal["admin", "member"]
    created_at: datetime


class PatCreate(_Request):
    name: PatName
    scopes: list[Scope] = Field(default_factory=lambda: [Scope.MODELS_READ, Scope.MODELS_INFER], min_length=1)
    expires_in_days: Annotated[int, Field(ge=1, le=PAT_TTL_CEILING_DAYS), BeforeValidator(_json_number)] | None = Field(
        None, description="at most the server's pat_max_ttl_days; default: its pat_default_ttl_days, capped at the "
                          "creating key's expiry; never beyond it")
    model_allowlist: Patterns | None = Field(None, description="within the creating key's allowlist when it has "
                                             "one (omitted: inherited)")


class PatOut(BaseModel):
    id: str
    user_id: str
    domain_id: str | None
    name: str
    display: str = Field(description="prefix and last four characters, e.g. cube_pat_...Ab12")
    scopes: list[str]
    model_allowlist: list[str] | None
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None
    state: Literal["active", "expired", "revoked"]
    issued_by: str | None = Field(description="who holds the key that minted it: its owner, or the admin who "
                                              "issued it (directly or with a key it had issued); null once that "
                                              "user is deleted")


class PatCreated(PatOut):
    token: str = Field(description="the secret; shown only in this response")


class MeOut(BaseModel):
    user: UserOut
    pat: PatOut
    memberships: dict[str, Literal["admin", "member"]]


class ModelPull(_Request):
    backend: str = Field(min_length=1, max_length=100)
    model: str = Field(min_length=1, max_length=300, pattern=r"^[^\s]+$")


class BackendStatusOut(BaseModel):
    name: str
    kind: str
    up: bool
    error: str | None
    last_ok: datetime | None
    models: int


class AdminModelOut(ModelObject):
    backend: str
    kind: str


class ReadyOut(BaseModel):
    """Public: only ``status``. With an operator's key (``access.may_read_operations``): the reasons too."""
    status: Literal["ready", "not_ready"]
    store: dict | None = Field(None, description="operators only: whether the store answers, and why not")
    backends: list[dict] | None = Field(None, description="operators only: each backend, up or down and why")


#: ``409`` on the routes that can answer it (a name taken, the last superadmin).
CONFLICT_RESPONSE = {409: {"model": ErrorEnvelope, "description": "Conflict: the name is taken, or the change "
                                                                  "would leave no superadmin"}}

ERROR_RESPONSES = {
    400: {"model": ErrorEnvelope, "description": "Invalid request"},
    401: {"model": ErrorEnvelope, "description": "Missing, malformed, unknown, expired or revoked API key"},
    403: {"model": ErrorEnvelope, "description": "Not a member, or the key lacks the scope / role"},
    404: {"model": ErrorEnvelope, "description": "Not found"},
}
