"""The single access decision used by model listing, model retrieval and (later) inference.

Rules, in order: the PAT must not be bound to another domain; the owner must be a member of the domain (a
superadmin acts everywhere); the PAT must hold the scope; the model must pass the PAT's allowlist and the
domain's allowlist when either is set (entries are exact ids or shell-style patterns such as ``llama3*``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from fnmatch import fnmatchcase

from enclave.store import Domain, Pat, User


class Scope(StrEnum):
    MODELS_READ = "models:read"     # list and retrieve models
    MODELS_INFER = "models:infer"   # use models for inference
    MANAGE = "manage"               # admin API (what it may touch still depends on the owner's roles)


ALL_SCOPES = tuple(s.value for s in Scope)
DEFAULT_SCOPES = (Scope.MODELS_READ.value, Scope.MODELS_INFER.value)


@dataclass(frozen=True)
class Principal:
    user: User
    pat: Pat
    roles: Mapping[str, str] = field(default_factory=dict)   # domain_id -> "admin" | "member"

    @property
    def is_superadmin(self) -> bool:
        return self.user.is_superadmin

    def has_scope(self, scope: Scope | str) -> bool:
        return str(scope) in self.pat.scopes

    def role_in(self, domain_id: str) -> str | None:
        return self.roles.get(domain_id)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    status: int = 200
    code: str | None = None
    message: str = ""

    def __bool__(self) -> bool:
        return self.allowed


ALLOW = Decision(True)


def _matches(model_id: str, patterns: Iterable[str]) -> bool:
    return any(p == model_id or fnmatchcase(model_id, p) for p in patterns)


def domain_access(principal: Principal, domain_id: str, domain: Domain | None, scope: Scope) -> Decision:
    """May this principal act in the domain with this scope? Unknown domains look like foreign ones to
    non-superadmins (403), so domain ids cannot be probed."""
    if principal.pat.domain_id is not None and principal.pat.domain_id != domain_id:
        return Decision(False, 403, "not_a_member", "This API key is bound to another domain.")
    if not principal.is_superadmin and (domain is None or principal.role_in(domain_id) is None):
        return Decision(False, 403, "not_a_member", "You are not a member of this domain.")
    if domain is None:
        return Decision(False, 404, "domain_not_found", "Domain not found.")
    if not principal.has_scope(scope):
        return Decision(False, 403, "insufficient_scope", f"This API key lacks the `{scope}` scope.")
    return ALLOW


#: The model part of the access decision: model id -> ALLOW or the refusal.
ModelRule = Callable[[str], Decision]

_NOT_IN_PAT_ALLOWLIST = Decision(False, 404, "model_not_found", "Model not in this API key's allowlist.")
_NOT_IN_DOMAIN_ALLOWLIST = Decision(False, 404, "model_not_found", "Model not enabled in this domain.")


def allow_every_model(model_id: str) -> Decision:
    """The rule when neither the PAT nor the domain has a model allowlist."""
    return ALLOW


def model_rule(principal: Principal, domain: Domain) -> ModelRule:
    """Which models this principal may use in this domain, for a principal ``domain_access`` already admitted.

    The allowlists are looked up once, so a listing decides per model only what depends on the model; with
    no allowlist at all the rule is ``allow_every_model``.
    """
    pat_allowlist = principal.pat.model_allowlist
    domain_allowlist = domain.model_allowlist
    if pat_allowlist is None and domain_allowlist is None:
        return allow_every_model

    def rule(model_id: str) -> Decision:
        if pat_allowlist is not None and not _matches(model_id, pat_allowlist):
            return _NOT_IN_PAT_ALLOWLIST
        if domain_allowlist is not None and not _matches(model_id, domain_allowlist):
            return _NOT_IN_DOMAIN_ALLOWLIST
        return ALLOW

    return rule


def may_use_model(principal: Principal, domain_id: str, domain: Domain | None, model_id: str,
                  *, scope: Scope = Scope.MODELS_INFER) -> Decision:
    """The whole decision for one model: ``domain_access`` first, then ``model_rule``."""
    gate = domain_access(principal, domain_id, domain, scope)
    if not gate:
        return gate
    assert domain is not None
    return model_rule(principal, domain)(model_id)


def may_manage_domain(principal: Principal, domain_id: str, domain: Domain | None) -> Decision:
    """Domain administration: superadmin, or a domain admin, with the manage scope."""
    gate = domain_access(principal, domain_id, domain, Scope.MANAGE)
    if not gate:
        return gate
    if principal.is_superadmin or principal.role_in(domain_id) == "admin":
        return ALLOW
    return Decision(False, 403, "not_domain_admin", "Only domain admins may manage this domain.")


def may_manage_platform(principal: Principal) -> Decision:
    if not principal.is_superadmin:
        return Decision(False, 403, "not_superadmin", "Only a superadmin may do this.")
    if not principal.has_scope(Scope.MANAGE):
        return Decision(False, 403, "insufficient_scope", "This API key lacks the `manage` scope.")
    return ALLOW


def may_read_operations(principal: Principal) -> Decision:
    """Operational detail (readiness reasons with backend error text, Prometheus metrics): the platform
    operators only, i.e. a superadmin's `manage` key that is bound to no domain."""
    if principal.pat.domain_id is not None:
        return Decision(False, 403, "domain_bound_key", "A key bound to a domain cannot read operational details.")
    return may_manage_platform(principal)
