"""The single access decision: membership, domain binding, scopes, PAT and domain allowlists."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from enclave.access import Principal, Scope, domain_access, may_manage_domain, may_manage_platform, may_use_model
from enclave.store import Domain, Pat, User

NOW = datetime(2026, 1, 1, tzinfo=UTC)
D1, D2 = "11111111-1111-1111-1111-111111111111", "22222222-2222-2222-2222-222222222222"


def principal(*, superadmin: bool = False, roles: dict[str, str] | None = None, scopes=("models:read",),
              bound: str | None = None, allow: tuple[str, ...] | None = None) -> Principal:
    user = User(id="u", name="u", is_superadmin=superadmin, created_at=NOW)
    pat = Pat(id="p", user_id="u", domain_id=bound, name="p", token_hash="h", last4="abcd", scopes=tuple(scopes),
              model_allowlist=allow, created_at=NOW, expires_at=NOW + timedelta(days=1), revoked_at=None,
              last_used_at=None)
    return Principal(user=user, pat=pat, roles=roles or {})


def domain(did: str, allow: tuple[str, ...] | None = None) -> Domain:
    return Domain(id=did, name=did[:4], model_allowlist=allow, created_at=NOW)


def test_membership_and_scope() -> None:
    member = principal(roles={D1: "member"})
    assert may_use_model(member, D1, domain(D1), "m", scope=Scope.MODELS_READ)
    d = may_use_model(member, D1, domain(D1), "m", scope=Scope.MODELS_INFER)
    assert not d and d.status == 403 and d.code == "insufficient_scope"
    assert may_use_model(member, D2, domain(D2), "m", scope=Scope.MODELS_READ).code == "not_a_member"
    assert may_use_model(member, D2, None, "m", scope=Scope.MODELS_READ).code == "not_a_member"


def test_superadmin_everywhere_but_unknown_domain_is_404() -> None:
    root = principal(superadmin=True, scopes=("models:read", "manage"))
    assert may_use_model(root, D2, domain(D2), "m", scope=Scope.MODELS_READ)
    assert domain_access(root, D2, None, Scope.MODELS_READ).status == 404
    assert may_manage_platform(root) and may_manage_domain(root, D1, domain(D1))
    assert may_manage_platform(principal(superadmin=True)).code == "insufficient_scope"
    assert may_manage_platform(principal(roles={D1: "admin"}, scopes=("manage",))).code == "not_superadmin"


def test_domain_bound_pat() -> None:
    p = principal(roles={D1: "member", D2: "member"}, bound=D2)
    assert may_use_model(p, D2, domain(D2), "m", scope=Scope.MODELS_READ)
    assert may_use_model(p, D1, domain(D1), "m", scope=Scope.MODELS_READ).code == "not_a_member"


def test_allowlists_exact_and_patterns() -> None:
    p = principal(roles={D1: "member"}, allow=("llama3*", "hf.co/org/exact:Q4"))
    dom = domain(D1)
    assert may_use_model(p, D1, dom, "llama3.2:3b", scope=Scope.MODELS_READ)
    assert may_use_model(p, D1, dom, "hf.co/org/exact:Q4", scope=Scope.MODELS_READ)
    assert may_use_model(p, D1, dom, "qwen", scope=Scope.MODELS_READ).code == "model_not_found"
    restricted = domain(D1, allow=("qwen*",))
    assert not may_use_model(p, D1, restricted, "llama3.2:3b", scope=Scope.MODELS_READ)
    assert may_use_model(principal(roles={D1: "member"}), D1, restricted, "qwen2", scope=Scope.MODELS_READ)
    assert may_use_model(principal(roles={D1: "member"}), D1, domain(D1, allow=()), "x",
                         scope=Scope.MODELS_READ).code == "model_not_found"


def test_domain_admin_rules() -> None:
    admin = principal(roles={D1: "admin"}, scopes=("manage",))
    assert may_manage_domain(admin, D1, domain(D1))
    assert may_manage_domain(admin, D2, domain(D2)).code == "not_a_member"
    assert may_manage_domain(principal(roles={D1: "member"}, scopes=("manage",)), D1,
                             domain(D1)).code == "not_domain_admin"
    assert may_manage_domain(principal(roles={D1: "admin"}), D1, domain(D1)).code == "insufficient_scope"
