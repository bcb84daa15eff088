"""The usage read decisions (enclave.access): who may read which usage, and the scope each read is held to."""

from __future__ import annotations

from enclave.access import UsageScope, may_read_domain_usage, may_read_own_usage, may_read_platform_usage

from tests.enclave.test_access import D1, D2, domain, principal

MANAGE = ("models:read", "manage")


def test_platform_usage_only_for_an_unbound_superadmin_manage_key() -> None:
    assert may_read_platform_usage(principal(superadmin=True, scopes=MANAGE)) == UsageScope(True)
    for who, code in ((principal(superadmin=True, scopes=MANAGE, bound=D1), "domain_bound_key"),
                      (principal(superadmin=True), "insufficient_scope"),
                      (principal(roles={D1: "admin"}, scopes=MANAGE), "not_superadmin")):
        refused = may_read_platform_usage(who)
        assert not refused and refused.status == 403 and refused.code == code


def test_domain_usage_for_its_managers_and_held_to_the_domain() -> None:
    admin = principal(roles={D1: "admin", D2: "member"}, scopes=MANAGE)
    assert may_read_domain_usage(admin, D1, domain(D1)) == UsageScope(True, domain_id=D1)
    assert may_read_domain_usage(admin, D2, domain(D2)).code == "not_domain_admin"
    assert may_read_domain_usage(admin, D2, None).code == "not_a_member"        # unknown looks foreign
    assert may_read_domain_usage(principal(roles={D1: "admin"}), D1, domain(D1)).code == "insufficient_scope"
    assert may_read_domain_usage(principal(roles={D1: "member"}, scopes=MANAGE), D1, domain(D1)).code == \
        "not_domain_admin"
    root = principal(superadmin=True, scopes=MANAGE, bound=D1)
    assert may_read_domain_usage(root, D1, domain(D1)) == UsageScope(True, domain_id=D1)
    assert may_read_domain_usage(root, D2, domain(D2)).code == "not_a_member"   # never outside its binding


def test_own_usage_scope() -> None:
    plain = principal(roles={D1: "member"}, uid="u1")
    assert may_read_own_usage(plain) == UsageScope(True, user_id="u1", pat_id="pu1")   # this key only
    assert may_read_own_usage(plain, pat_id="pu1")
    assert may_read_own_usage(plain, pat_id="other").code == "insufficient_scope"
    assert may_read_own_usage(plain, user_id="u2").code == "not_own_usage"
    managing = principal(roles={D1: "member"}, scopes=MANAGE, uid="u1", bound=D1)
    assert may_read_own_usage(managing, pat_id="other") == UsageScope(True, domain_id=D1, user_id="u1")
    assert may_read_own_usage(managing, user_id="u1")
