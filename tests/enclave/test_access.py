"""The single access decision: membership, domain binding, scopes, PAT and domain allowlists."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from enclave.access import (Principal, Scope, bound_new_pat, domain_access, may_issue_pat, may_manage_domain,
                            may_manage_platform, may_revoke_pat, may_use_model)
from enclave.store import Domain, Pat, User

NOW = datetime(2026, 1, 1, tzinfo=UTC)
D1, D2 = "11111111-1111-1111-1111-111111111111", "22222222-2222-2222-2222-222222222222"


def principal(*, superadmin: bool = False, roles: dict[str, str] | None = None, scopes=("models:read",),
              bound: str | None = None, allow: tuple[str, ...] | None = None, uid: str = "u") -> Principal:
    user = User(id=uid, name=uid, is_superadmin=superadmin, created_at=NOW)
    pat = Pat(id="p" + uid, user_id=uid, domain_id=bound, name="p", token_hash="h", last4="abcd", scopes=tuple(scopes),
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


def test_platform_powers_need_an_unbound_key() -> None:
    bound_root = principal(superadmin=True, scopes=("manage",), bound=D1)
    assert may_manage_platform(bound_root).code == "domain_bound_key"
    assert may_manage_domain(bound_root, D1, domain(D1))          # its own domain it still administers


def test_who_may_mint_for_whom() -> None:
    admin = principal(roles={D1: "admin"}, scopes=("manage",), uid="admin")
    root_user = principal(superadmin=True, uid="root").user
    member = principal(uid="member").user
    other_admin = principal(uid="other").user
    assert may_issue_pat(admin, admin.user, None, None, None)                       # (a) for themself
    assert may_issue_pat(admin, member, D1, domain(D1), "member")                   # (c) bound, a member
    assert may_issue_pat(admin, other_admin, D1, domain(D1), "admin")               # (c) an equal
    assert may_issue_pat(admin, root_user, D1, domain(D1), "member").code == "owner_outranks_issuer"
    assert may_issue_pat(admin, member, None, None, None).code == "not_superadmin"  # unbound: platform only
    assert may_issue_pat(admin, member, D2, domain(D2), "member").code == "not_a_member"
    assert may_issue_pat(admin, member, D1, domain(D1), None).code == "member_not_found"
    member_admin_of_d2 = principal(roles={D1: "member", D2: "admin"}, scopes=("manage",), uid="m2")
    assert may_issue_pat(member_admin_of_d2, member, D1, domain(D1), "member").code == "not_domain_admin"
    root = principal(superadmin=True, scopes=("manage",), uid="root")
    assert may_issue_pat(root, member, None, None, None)                            # (b) anyone
    assert may_issue_pat(principal(superadmin=True, scopes=("manage",), uid="r2", bound=D1), root_user, D1,
                         domain(D1), "admin").code == "owner_outranks_issuer"       # a bound key is no superadmin's


def _bounds(creator: Principal, **kw):
    args = {"scopes": ["models:read"], "domain_id": None, "expires_in_days": None, "model_allowlist": None,
            "now": NOW, "default_days": 30, "max_days": 365}
    return bound_new_pat(creator, **{**args, **kw})


def test_a_new_key_is_bounded_by_its_creator() -> None:
    creator = principal(scopes=("models:read", "manage"), allow=("llama3*", "qwen2:0.5b"), bound=D1)
    ok = _bounds(creator)
    assert ok and ok.terms.expires_at == creator.pat.expires_at                    # default capped at 1 day
    assert ok.terms.model_allowlist == ("llama3*", "qwen2:0.5b") and ok.terms.domain_id == D1
    assert _bounds(creator, expires_in_days=1).terms.expires_at == creator.pat.expires_at
    assert _bounds(creator, expires_in_days=2).code == "expiry_too_long"
    assert _bounds(creator, expires_in_days=400).code == "expiry_too_long"
    assert _bounds(creator, scopes=["models:infer"]).code == "insufficient_scope"
    assert _bounds(creator, domain_id=D2).code == "not_a_member"
    assert _bounds(creator, model_allowlist=["llama3.2:3b", "llama3*"]).terms.model_allowlist == \
        ("llama3.2:3b", "llama3*")
    for wider in (["*"], ["llama*"], ["qwen2*"], ["mistral"], ["llama3?"]):
        assert _bounds(creator, model_allowlist=wider).code == "model_allowlist_too_wide", wider
    free = principal(scopes=("models:read", "manage"))
    assert _bounds(free, model_allowlist=["*"]).terms.model_allowlist == ("*",)
    assert _bounds(free).terms.model_allowlist is None


def test_keys_by_id() -> None:
    owner = principal(roles={D1: "member"}, scopes=("manage",), uid="owner")
    key_in_d1 = principal(uid="owner", bound=D1).pat
    assert may_revoke_pat(owner, key_in_d1, domain(D1))
    assert may_revoke_pat(principal(roles={D1: "member"}, scopes=("manage",), uid="owner", bound=D2),
                          key_in_d1, domain(D1)).code == "pat_not_found"             # other binding
    assert may_revoke_pat(principal(roles={D1: "admin"}, scopes=("manage",), uid="adm"), key_in_d1, domain(D1))
    assert not may_revoke_pat(principal(roles={D2: "admin"}, scopes=("manage",), uid="adm"), key_in_d1, domain(D1))
    assert may_revoke_pat(principal(superadmin=True, scopes=("manage",), uid="r"), key_in_d1, domain(D1))
    unbound_key = principal(uid="owner").pat
    assert may_revoke_pat(principal(roles={D1: "admin"}, scopes=("manage",), uid="adm"), unbound_key,
                          None).code == "pat_not_found"
    assert may_revoke_pat(owner, None, None).status == 404
