"""Every authorization decision of the service, one named function per action; handlers only call them.

Model use (listing, retrieval and later inference), in order: the PAT must not be bound to another domain;
the owner must be a member of the domain (a superadmin acts everywhere); the PAT must hold the scope; the model
must pass the PAT's allowlist and the domain's allowlist when either is set (entries are exact ids or
shell-style patterns such as ``llama3*``).

Keys (see README "Keys and who may mint them"): a PAT bound to a domain never has platform powers; anyone
mints keys for themself within their key's bounds; an unbound superadmin key mints for anyone; a domain admin
mints domain-bound keys for members of that domain who are not superadmins. A new key never exceeds the key
that creates it: scopes, domain binding, lifetime and model allowlist are all bounded by it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from fnmatch import fnmatchcase

from enclave.store import Domain, Pat, User


class Scope(StrEnum):
    MODELS_READ = "models:read"     # list and retrieve models
    MODELS_INFER = "models:infer"   # use models for inference
    MANAGE = "manage"               # admin API (what it may touch still depends on the owner's roles)


ALL_SCOPES = tuple(s.value for s in Scope)
DEFAULT_SCOPES = (Scope.MODELS_READ.value, Scope.MODELS_INFER.value)
_ROLE_RANK = {"member": 1, "admin": 2}


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
    param: str | None = None

    def __bool__(self) -> bool:
        return self.allowed


ALLOW = Decision(True)


def _matches(model_id: str, patterns: Iterable[str]) -> bool:
    return any(p == model_id or fnmatchcase(model_id, p) for p in patterns)


def _lacks(scope: Scope) -> Decision:
    return Decision(False, 403, "insufficient_scope", f"This API key lacks the `{scope}` scope.")


def domain_membership(principal: Principal, domain_id: str, domain: Domain | None) -> Decision:
    """The part of ``domain_access`` that needs no scope: the key's binding and the owner's membership."""
    if principal.pat.domain_id is not None and principal.pat.domain_id != domain_id:
        return Decision(False, 403, "not_a_member", "This API key is bound to another domain.")
    if not principal.is_superadmin and (domain is None or principal.role_in(domain_id) is None):
        return Decision(False, 403, "not_a_member", "You are not a member of this domain.")
    if domain is None:
        return Decision(False, 404, "domain_not_found", "Domain not found.")
    return ALLOW


def domain_access(principal: Principal, domain_id: str, domain: Domain | None, scope: Scope) -> Decision:
    """May this principal act in the domain with this scope? Unknown domains look like foreign ones to
    non-superadmins (403), so domain ids and names cannot be probed."""
    gate = domain_membership(principal, domain_id, domain)
    if not gate:
        return gate
    if not principal.has_scope(scope):
        return _lacks(scope)
    return ALLOW


def may_list_models(principal: Principal, domain_id: str, domain: Domain | None) -> Decision:
    """The domain part of model discovery (``model_rule`` then decides per model)."""
    return domain_access(principal, domain_id, domain, Scope.MODELS_READ)


#: The model part of the access decision: model id -> ALLOW or the refusal.
ModelRule = Callable[[str], Decision]

_NOT_IN_PAT_ALLOWLIST = Decision(False, 404, "model_not_found", "Model not in this API key's allowlist.", "model")
_NOT_IN_DOMAIN_ALLOWLIST = Decision(False, 404, "model_not_found", "Model not enabled in this domain.", "model")


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


def may_infer_in_domain(principal: Principal, domain_id: str, domain: Domain | None) -> Decision:
    """The domain part of inference, decided before the body is read (``may_use_model`` then decides the model
    the body names)."""
    return domain_access(principal, domain_id, domain, Scope.MODELS_INFER)


def may_read_backend_version(principal: Principal, domain_id: str, domain: Domain | None) -> Decision:
    """Ollama's ``GET /api/version`` under a domain: what discovery needs (``models:read`` there), since clients
    ask it before listing."""
    return domain_access(principal, domain_id, domain, Scope.MODELS_READ)


#: Ollama's model management routes; the gateway never proxies them.
OLLAMA_MANAGEMENT_ROUTES = ("pull", "push", "create", "copy", "delete")


def may_manage_models_through_proxy(principal: Principal, action: str) -> Decision:
    """Ollama's ``/api/pull``, ``push``, ``create``, ``copy``, ``delete`` under a domain: refused to every key,
    a superadmin's too. Models are the platform's, changed only through the admin API (whose own checks apply),
    so no domain key can add, overwrite or remove a model other tenants use."""
    return Decision(False, 403, "use_admin_api",
                    f"`{action}` is not available through the gateway; a superadmin manages models with the admin "
                    "API (POST /admin/models, DELETE /admin/models/{model}).")


# ---- administration --------------------------------------------------------------------------------------
def may_view_self(principal: Principal) -> Decision:
    """``GET /users/me``: any valid key may see who it belongs to."""
    return ALLOW


def visible_roles(principal: Principal) -> dict[str, str]:
    """The memberships a key may see: all of them, or for a domain-bound key only its own domain's."""
    bound = principal.pat.domain_id
    return {d: r for d, r in principal.roles.items() if bound is None or d == bound}


def may_manage_platform(principal: Principal) -> Decision:
    """Platform administration: a superadmin's key that is bound to no domain, with the manage scope."""
    if not principal.is_superadmin:
        return Decision(False, 403, "not_superadmin", "Only a superadmin may do this.")
    if principal.pat.domain_id is not None:
        return Decision(False, 403, "domain_bound_key",
                        "This API key is bound to a domain; platform administration needs an unbound key.")
    if not principal.has_scope(Scope.MANAGE):
        return _lacks(Scope.MANAGE)
    return ALLOW


def may_manage_domain(principal: Principal, domain_id: str, domain: Domain | None) -> Decision:
    """Domain administration: superadmin, or a domain admin, with the manage scope."""
    gate = domain_access(principal, domain_id, domain, Scope.MANAGE)
    if not gate:
        return gate
    if principal.is_superadmin or principal.role_in(domain_id) == "admin":
        return ALLOW
    return Decision(False, 403, "not_domain_admin", "Only domain admins may manage this domain.")


_USER_NOT_FOUND = Decision(False, 404, "user_not_found", "User not found.", "user_id")


def may_set_member(principal: Principal, domain_id: str, domain: Domain | None, user: User | None, *,
                   named_by_id: bool, is_member: bool) -> Decision:
    """Add a user to the domain or change a member's role: a domain's manager. Outside the platform nobody sees
    the user directory, so a domain admin names a user who is not yet a member by id (an unguessable UUID its
    holder shares, shown by ``GET /users/me``); a name resolves only among the domain's members, and any other
    name looks unknown (404), so other tenants' user names cannot be probed."""
    gate = may_manage_domain(principal, domain_id, domain)
    if not gate:
        return gate
    if user is None:
        return _USER_NOT_FOUND
    if named_by_id or is_member or may_manage_platform(principal):
        return ALLOW
    return _USER_NOT_FOUND


def may_manage_own_keys(principal: Principal) -> Decision:
    """``/users/me/pats``: the manage scope (what the key then sees is ``is_own_key_in_binding``)."""
    return ALLOW if principal.has_scope(Scope.MANAGE) else _lacks(Scope.MANAGE)


def is_own_key_in_binding(principal: Principal, pat: Pat) -> bool:
    """A key the principal manages as its owner: its own, and, for a domain-bound key, bound to the same domain."""
    bound = principal.pat.domain_id
    return pat.user_id == principal.user.id and (bound is None or pat.domain_id == bound)


_PAT_NOT_FOUND = Decision(False, 404, "pat_not_found", "API key not found.", "pat_id")


def may_manage_pat(principal: Principal, pat: Pat | None, pat_domain: Domain | None) -> Decision:
    """See or revoke one key by id: its owner (within the caller key's binding), an admin of the domain the key
    is bound to, or an unbound superadmin key. Anything else looks like an unknown id (404), so ids cannot be
    probed."""
    if pat is None:
        return _PAT_NOT_FOUND
    if is_own_key_in_binding(principal, pat):
        return may_manage_own_keys(principal)
    if may_manage_platform(principal):
        return ALLOW
    if pat.domain_id is not None and may_manage_domain(principal, pat.domain_id, pat_domain):
        return ALLOW
    return _PAT_NOT_FOUND


def may_view_pat(principal: Principal, pat: Pat | None, pat_domain: Domain | None) -> Decision:
    return may_manage_pat(principal, pat, pat_domain)


def may_revoke_pat(principal: Principal, pat: Pat | None, pat_domain: Domain | None) -> Decision:
    return may_manage_pat(principal, pat, pat_domain)


_MEMBER_NOT_FOUND = Decision(False, 404, "member_not_found", "Member not found.", "user_id")


def issuer_still_holds(pat: Pat, issuer: User | None, issuer_roles: Mapping[str, str]) -> bool:
    """Whether a key minted for someone else may outlive a change to its issuer (a role lost, a membership
    removed, superadmin revoked, the issuer deleted: ``issuer`` None): only while the issuer could still mint
    it. The issuer holds the token, so otherwise a removed admin would go on acting in the domain as the member."""
    if pat.issued_by is None or pat.issued_by == pat.user_id:
        return True                         # self-made: the owner's own standing decides
    if issuer is None:
        return False
    if issuer.is_superadmin:
        return True
    return pat.domain_id is not None and issuer_roles.get(pat.domain_id) == "admin"


def may_issue_pat(minter: Principal, owner: User | None, domain_id: str | None, domain: Domain | None,
                  owner_role: str | None) -> Decision:
    """Who may mint a key for whom (the key's own bounds are ``bound_new_pat``).

    ``domain_id`` is the domain the new key is bound to (None: unbound); ``owner_role`` the owner's role there.
    (a) anyone for themself; (b) an unbound superadmin key for anyone; (c) a domain admin, domain-bound keys
    only, for a member of that domain who is not a superadmin and holds no more there than the minter.
    An unknown owner (None) and a user who is no member of the domain get the same 404, so names cannot be probed.
    """
    if owner is None:
        return _MEMBER_NOT_FOUND if domain_id is not None else _USER_NOT_FOUND
    if owner.id == minter.user.id:
        return may_manage_own_keys(minter)
    if domain_id is None:
        return may_manage_platform(minter)
    gate = may_manage_domain(minter, domain_id, domain)
    if not gate:
        return gate
    if owner_role is None:
        return _MEMBER_NOT_FOUND
    if may_manage_platform(minter):
        return ALLOW
    if owner.is_superadmin:
        return Decision(False, 403, "owner_outranks_issuer",
                        "A key for a superadmin can only be minted by that superadmin or another superadmin.")
    minter_role = "admin" if minter.is_superadmin else minter.role_in(domain_id)
    if minter_role is None or _ROLE_RANK[owner_role] > _ROLE_RANK[minter_role]:
        return Decision(False, 403, "owner_outranks_issuer",
                        "You may not mint a key for a member who holds more in this domain than you.")
    return ALLOW


# ---- the bounds of a new key -----------------------------------------------------------------------------
@dataclass(frozen=True)
class PatTerms:
    """What a new key gets, once ``bound_new_pat`` has admitted the request."""
    scopes: tuple[str, ...]
    domain_id: str | None
    expires_at: datetime
    model_allowlist: tuple[str, ...] | None
    issued_by: str | None   # who holds the token: see ``issuer_of_new_pat``


@dataclass(frozen=True)
class PatBounds(Decision):
    terms: PatTerms | None = None


_WILDCARD = frozenset("*?[")


def _allowlist_within(requested: Sequence[str], creator: Sequence[str]) -> list[str]:
    """Entries of ``requested`` the creator's allowlist does not cover: an exact id must be matched by it, a
    pattern must appear in it verbatim (pattern containment is not decided)."""
    return [r for r in requested
            if (r not in creator if _WILDCARD & set(r) else not _matches(r, creator))]


def issuer_of_new_pat(creator: Principal) -> str | None:
    """Whom a new key is recorded as issued by: whoever holds the creating key, i.e. its own issuer (its owner
    for a self-made key, the admin who minted it otherwise; None once that issuer is deleted). So a key an admin
    minted for a member never launders the admin's further keys into ones that look self-made by the member."""
    return creator.pat.issued_by


def bound_new_pat(creator: Principal, *, scopes: Sequence[str], domain_id: str | None,
                  expires_in_days: int | None, model_allowlist: Sequence[str] | None, now: datetime,
                  default_days: int, max_days: int) -> PatBounds:
    """Bound a new key by the key that creates it: scopes ⊆ the creator's; a domain-bound creator only makes
    keys bound to its domain; expiry ≤ the creator's (the default lifetime is capped at it, an explicit longer
    one refused); allowlist ⊆ the creator's when it has one (omitted: inherited)."""
    wanted = tuple(dict.fromkeys(str(s) for s in scopes))
    missing = [s for s in wanted if not creator.has_scope(s)]
    if missing:
        return PatBounds(False, 403, "insufficient_scope",
                         f"A new API key cannot have scopes the current key lacks: {', '.join(missing)}.", "scopes")
    bound = creator.pat.domain_id
    if bound is not None:
        if domain_id not in (None, bound):
            return PatBounds(False, 403, "not_a_member", "This API key is bound to another domain.")
        domain_id = bound
    if expires_in_days is not None and expires_in_days > max_days:
        return PatBounds(False, 400, "expiry_too_long", f"`expires_in_days` may be at most {max_days}.",
                         "expires_in_days")
    cap = creator.pat.expires_at
    if expires_in_days is None:
        expires_at = min(now + timedelta(days=default_days), cap)
    else:
        expires_at = now + timedelta(days=expires_in_days)
        if expires_at > cap:
            return PatBounds(False, 400, "expiry_too_long",
                             f"A new API key cannot outlive the current one (it expires {cap.isoformat()}); "
                             "ask for fewer days.", "expires_in_days")
    allow = tuple(model_allowlist) if model_allowlist is not None else None
    limit = creator.pat.model_allowlist
    if limit is not None:
        if allow is None:
            allow = limit
        elif wider := _allowlist_within(allow, limit):
            return PatBounds(False, 403, "model_allowlist_too_wide",
                             "A new API key may only use models the current key may use; not covered: "
                             f"{', '.join(wider)}.", "model_allowlist")
    return PatBounds(True, terms=PatTerms(scopes=wanted, domain_id=domain_id, expires_at=expires_at,
                                          model_allowlist=allow, issued_by=issuer_of_new_pat(creator)))


def may_read_operations(principal: Principal) -> Decision:
    """Operational detail (readiness reasons with backend error text, Prometheus metrics): the platform
    operators only, i.e. a superadmin's `manage` key that is bound to no domain."""
    if principal.pat.domain_id is not None:
        return Decision(False, 403, "domain_bound_key", "A key bound to a domain cannot read operational details.")
    return may_manage_platform(principal)


# ---- usage (enclave.usage, enclave.api.usage) ------------------------------------------------------------
@dataclass(frozen=True)
class UsageScope(Decision):
    """What usage a read may see: only the records matching every field set here (None: any)."""
    domain_id: str | None = None
    user_id: str | None = None
    pat_id: str | None = None


def _usage_refused(decision: Decision) -> UsageScope:
    return UsageScope(False, decision.status, decision.code, decision.message, decision.param)


def may_read_platform_usage(principal: Principal) -> UsageScope:
    """``GET /admin/usage``: every domain's usage, for platform administration (an unbound superadmin key with
    the manage scope; a domain-bound key never)."""
    gate = may_manage_platform(principal)
    return UsageScope(True) if gate else _usage_refused(gate)


def may_read_domain_usage(principal: Principal, domain_id: str, domain: Domain | None) -> UsageScope:
    """``GET /domains/{domain}/usage``: that domain's usage, for whoever manages the domain (its admins, a
    superadmin), with the manage scope. Unknown domains look like foreign ones (``domain_access``)."""
    gate = may_manage_domain(principal, domain_id, domain)
    return UsageScope(True, domain_id=domain_id) if gate else _usage_refused(gate)


def may_read_own_usage(principal: Principal, *, user_id: str | None = None,
                       pat_id: str | None = None) -> UsageScope:
    """``GET /users/me/usage``: a key with the manage scope sees all of its owner's usage, any key sees its own
    requests (it made them); a domain-bound key only within its domain. ``user_id``/``pat_id`` are the filters
    asked for: another user's usage is refused, and another key's needs the manage scope."""
    if user_id is not None and user_id != principal.user.id:
        return UsageScope(False, 403, "not_own_usage", "This route shows your own usage only.", "user_id")
    manages = principal.has_scope(Scope.MANAGE)
    if not manages and pat_id is not None and pat_id != principal.pat.id:
        return UsageScope(False, 403, "insufficient_scope", "Without the `manage` scope an API key sees only its "
                          "own usage.", "pat_id")
    return UsageScope(True, domain_id=principal.pat.domain_id, user_id=principal.user.id,
                      pat_id=None if manages else principal.pat.id)


# ---- receipts (enclave.receipts) ---------------------------------------------------------------------------
RECEIPT_NOT_FOUND = Decision(False, 404, "receipt_not_found", "Receipt not found.")


def may_fetch_receipt(principal: Principal, domain_id: str | None, made_by_pat: str | None,
                      made_in_domain: str | None) -> Decision:
    """A request's receipt goes to the key that made the request, asked under the domain it was made in, and to
    no one else: another key of the same user, another tenant and a superadmin all get the 404 an unknown
    request id gets (``RECEIPT_NOT_FOUND``), so a receipt's existence is never revealed. ``domain_id``: the
    domain the path names (None when unknown); ``made_by_pat``/``made_in_domain``: the ledger's record of the
    request (None when there is none). Membership is not asked again: the receipt is the key's own past."""
    if made_by_pat is None or made_in_domain is None or domain_id is None:
        return RECEIPT_NOT_FOUND
    if principal.pat.id != made_by_pat or domain_id != made_in_domain:
        return RECEIPT_NOT_FOUND
    return ALLOW


# ---- audit trail ---------------------------------------------------------------------------------------------
def may_export_audit(principal: Principal) -> Decision:
    """The audit export (every admin action on the platform): the platform operators only, as for platform
    administration: a superadmin's unbound `manage` key."""
    return may_manage_platform(principal)


# ---- limits and budgets (enclave.quotas) -------------------------------------------------------------------
def may_manage_domain_ceiling(principal: Principal) -> Decision:
    """A domain's own limits (its ceiling): set, clear and read by the platform (an unbound superadmin key)."""
    return may_manage_platform(principal)


def may_read_domain_ceiling(principal: Principal, domain_id: str, domain: Domain | None) -> Decision:
    """A domain's admins may read the ceiling they set their members' and keys' limits under."""
    return may_manage_domain(principal, domain_id, domain)


def may_manage_member_limits(principal: Principal, domain_id: str, domain: Domain | None,
                             is_member: bool) -> Decision:
    """A member's limits in a domain: that domain's managers; anyone who is not a member looks unknown (404)."""
    gate = may_manage_domain(principal, domain_id, domain)
    if not gate:
        return gate
    return ALLOW if is_member else _MEMBER_NOT_FOUND


def may_manage_domain_pat_limits(principal: Principal, domain_id: str, domain: Domain | None,
                                 pat: Pat | None) -> Decision:
    """A domain-bound key's limits: that domain's managers; a key not bound to it looks unknown (404)."""
    gate = may_manage_domain(principal, domain_id, domain)
    if not gate:
        return gate
    return ALLOW if pat is not None and pat.domain_id == domain_id else _PAT_NOT_FOUND


def may_manage_any_pat_limits(principal: Principal, pat: Pat | None) -> Decision:
    """Any key's limits, bound or not: the platform only."""
    gate = may_manage_platform(principal)
    if not gate:
        return gate
    return ALLOW if pat is not None else _PAT_NOT_FOUND


def may_set_limits_of(principal: Principal, owner_id: str) -> Decision:
    """Setting or clearing a member's or a domain-bound key's limits (after ``may_manage_member_limits`` or
    ``may_manage_domain_pat_limits``): a domain admin never its own (its membership, its keys), or it could
    lift what the platform or another admin set on it; those are the platform's, or another admin's, to change."""
    if may_manage_platform(principal) or owner_id != principal.user.id:
        return ALLOW
    return Decision(False, 403, "own_limits", "A domain admin cannot change its own limits; the platform or "
                                              "another admin of the domain sets them.")


def limits_within_ceiling(principal: Principal, requested: Mapping[str, int | None],
                          ceiling: Mapping[str, int | None]) -> Decision:
    """A domain admin sets limits within the domain's ceiling: for every kind the ceiling limits, an explicit
    value must not exceed it, and "unlimited" (-1) is refused. Values left to the platform default (None) are
    not the admin's choice, and the domain's own counter still caps the whole domain. The platform (an
    unbound superadmin key) sets any value: it sets the ceiling itself."""
    if may_manage_platform(principal):
        return ALLOW
    for kind, cap in ceiling.items():
        value = requested.get(kind)
        if cap is None or value is None:
            continue
        if value < 0:
            return Decision(False, 403, "above_domain_ceiling",
                            f"`{kind}` cannot be unlimited: the domain's ceiling is {cap}.", kind)
        if value > cap:
            return Decision(False, 403, "above_domain_ceiling",
                            f"`{kind}` may be at most {cap}, the domain's ceiling.", kind)
    return ALLOW


def may_read_own_limits(principal: Principal, domain_id: str, domain: Domain | None) -> Decision:
    """``GET /users/me/limits``: any key of a member (within its binding), whatever its scopes, may read what
    binds it there."""
    return domain_membership(principal, domain_id, domain)
