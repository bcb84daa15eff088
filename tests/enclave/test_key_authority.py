"""Attacks on key minting and key management over HTTPS (issue 8 items 1-3, 20, 21): each was possible before."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime

import pytest

from tests.enclave.conftest import EnclaveServer, FakeClock, World, make_settings, ROW_KEY
from tests.enclave.test_service import backends, start_service
from tests.fakes.ollama import FakeOllama
from tests.fakes.vllm import FakeVllm


@pytest.fixture
def svc(tmp_path, clock: FakeClock) -> Iterator[tuple[EnclaveServer, World]]:
    with FakeOllama() as ollama, FakeVllm() as vllm:
        server, world = start_service(make_settings(tmp_path, backends=backends(ollama, vllm)), clock)
        try:
            yield server, world
        finally:
            server.stop()


def _code(r) -> str:
    return r.json()["error"]["code"]


def test_domain_admin_cannot_mint_a_key_for_a_superadmin(svc) -> None:
    """Item 1: add the superadmin to your domain, mint a key 'as' it, use it for platform powers."""
    server, world = svc
    a, sa = world.domains["A"], world.users["superadmin"]
    with server.client(world.tokens["admin_a"]) as admin:
        assert admin.put(f"/domains/{a}/members/{sa}", json={"role": "member"}).status_code == 200
        r = admin.post(f"/domains/{a}/members/{sa}/pats", json={"name": "stolen", "scopes": ["manage"]})
        assert r.status_code == 403 and _code(r) == "owner_outranks_issuer"
        assert admin.get(f"/domains/{a}/pats").json() == []            # nothing was minted


def test_a_domain_bound_key_never_has_platform_powers(svc) -> None:
    """Item 1, second half: even a superadmin's own key loses platform powers once bound to a domain."""
    server, world = svc
    a, sa = world.domains["A"], world.users["superadmin"]
    with server.client(world.tokens["superadmin"]) as root:
        root.put(f"/domains/{a}/members/{sa}", json={"role": "admin"})
        bound = root.post(f"/domains/{a}/members/{sa}/pats", json={"name": "bound", "scopes": ["manage"]}).json()
        assert bound["domain_id"] == a
    with server.client(bound["token"]) as c:
        for method, path, body in (("GET", "/admin/users", None), ("POST", "/admin/users", {"name": "evil"}),
                                   ("PATCH", f"/admin/users/{world.users['admin_a']}", {"superadmin": True}),
                                   ("POST", f"/admin/users/{world.users['admin_a']}/pats", {"name": "k"})):
            r = c.request(method, path, json=body)
            assert r.status_code == 403 and _code(r) == "domain_bound_key", (method, path, r.text)
        assert c.get(f"/domains/{a}/members").status_code == 200       # still administers its own domain


def test_domain_admin_mints_only_for_members_it_outranks_and_the_key_is_visibly_its(svc) -> None:
    server, world = svc
    a = world.domains["A"]
    with server.client(world.tokens["member_a"]) as member:              # a member is no minter for others
        r = member.post(f"/domains/{a}/members/{world.users['noscope_a']}/pats", json={"name": "x"})
        assert r.status_code == 403
    with server.client(world.tokens["admin_a"]) as admin:
        made = admin.post(f"/domains/{a}/members/{world.users['member_a']}/pats",
                          json={"name": "issued", "scopes": ["models:read"]})
        assert made.status_code == 201
        made = made.json()
        assert made["issued_by"] == world.users["admin_a"] and made["user_id"] == world.users["member_a"]
        assert made["domain_id"] == a
        assert admin.post(f"/domains/{a}/members/{world.users['member_b']}/pats",
                          json={"name": "x"}).json()["error"]["code"] == "member_not_found"
    with server.client(world.tokens["superadmin"]) as root:
        listed = {p["id"]: p for p in root.get(f"/admin/users/{world.users['member_a']}/pats").json()}
        assert listed[made["id"]]["issued_by"] == world.users["admin_a"]
        assert listed[world.pat_ids["member_a"]]["issued_by"] == world.users["member_a"]


def test_a_domain_bound_key_manages_only_keys_bound_to_its_domain(svc) -> None:
    """Item 2: a key bound to B must not list or revoke the same user's keys for A or unbound ones."""
    server, world = svc
    a, b, user = world.domains["A"], world.domains["B"], world.users["bound_b"]
    with server.client(world.tokens["superadmin"]) as root:
        in_a = root.post(f"/domains/{a}/members/{user}/pats", json={"name": "in-a"}).json()
        unbound = root.post(f"/admin/users/{user}/pats", json={"name": "anywhere"}).json()
    with server.client(world.tokens["bound_b"]) as c:
        assert c.get("/users/me").json()["memberships"] == {b: "member"}    # not its role in A
        listed = c.get("/users/me/pats").json()
        assert [p["id"] for p in listed] == [world.pat_ids["bound_b"]]
        assert {p["domain_id"] for p in listed} == {b}
        for foreign in (in_a["id"], unbound["id"]):
            for method, path in (("DELETE", f"/users/me/pats/{foreign}"), ("DELETE", f"/pats/{foreign}"),
                                 ("GET", f"/pats/{foreign}")):
                r = c.request(method, path)
                assert r.status_code == 404 and _code(r) == "pat_not_found", (method, path)
    with server.client(in_a["token"]) as still:
        assert still.get(f"/proxy/{a}/v1/models").status_code == 200      # nothing was revoked


def test_a_new_key_never_exceeds_its_creator(svc, clock: FakeClock) -> None:
    """Item 3: a 1-day single-model key with `manage` used to mint a 365-day unrestricted one."""
    server, world = svc
    with server.client(world.tokens["superadmin"]) as root:
        narrow = root.post(f"/admin/users/{world.users['admin_a']}/pats",
                           json={"name": "narrow", "scopes": ["manage", "models:read"], "expires_in_days": 1,
                                 "model_allowlist": ["llama3.2:3b", "meta-llama/*"]}).json()
    cap = datetime.fromisoformat(narrow["expires_at"])
    with server.client(narrow["token"]) as c:
        r = c.post("/users/me/pats", json={"name": "wide", "scopes": ["models:read"], "expires_in_days": 365})
        assert r.status_code == 400 and _code(r) == "expiry_too_long" and "outlive" in r.json()["error"]["message"]
        r = c.post("/users/me/pats", json={"name": "wide", "scopes": ["models:read"], "model_allowlist": ["*"]})
        assert r.status_code == 403 and _code(r) == "model_allowlist_too_wide" and "*" in r.json()["error"]["message"]
        r = c.post("/users/me/pats", json={"name": "wide", "scopes": ["models:read"],
                                           "model_allowlist": ["meta-llama/Llama-3.1-8B-Instruct", "qwen2"]})
        assert r.status_code == 403 and "qwen2" in r.json()["error"]["message"]
        inherited = c.post("/users/me/pats", json={"name": "inherits", "scopes": ["models:read"]}).json()
        assert inherited["model_allowlist"] == ["llama3.2:3b", "meta-llama/*"]
        assert datetime.fromisoformat(inherited["expires_at"]) <= cap   # default TTL capped at the creator's
        within = c.post("/users/me/pats", json={"name": "within", "scopes": ["models:read"],
                                                "model_allowlist": ["meta-llama/*", "meta-llama/Llama-3.1-8B"]})
        assert within.status_code == 201, within.text
        a = world.domains["A"]
        r = c.post(f"/domains/{a}/members/{world.users['member_a']}/pats",
                   json={"name": "for-member", "scopes": ["models:read"], "model_allowlist": ["qwen*"]})
        assert r.status_code == 403 and _code(r) == "model_allowlist_too_wide"   # also when minting for others
    with server.client(inherited["token"]) as child:
        ids = [m["id"] for m in child.get(f"/proxy/{world.domains['A']}/v1/models").json()["data"]]
        assert ids == ["llama3.2:3b", "meta-llama/Llama-3.1-8B-Instruct"]


def test_keys_by_id_wherever_the_caller_may_manage_them(svc) -> None:
    """Item 20: a superadmin revokes another user's key by id alone; others cannot probe ids."""
    server, world = svc
    a = world.domains["A"]
    victim = world.pat_ids["member_a"]
    for label in ("member_b", "nonmember", "bound_b", "admin_a"):          # admin_a: member_a's key is unbound
        with server.client(world.tokens[label]) as c:
            assert c.get(f"/pats/{victim}").status_code == 404, label
            assert c.delete(f"/pats/{victim}").status_code == 404, label
    with server.client(world.tokens["admin_a"]) as admin:
        issued = admin.post(f"/domains/{a}/members/{world.users['member_a']}/pats", json={"name": "i"}).json()
        assert admin.get(f"/pats/{issued['id']}").json()["issued_by"] == world.users["admin_a"]
        assert admin.delete(f"/pats/{issued['id'].upper()}").status_code == 204    # any case
        assert admin.get(f"/pats/{issued['id']}").json()["state"] == "revoked"
        assert admin.get("/pats/not-an-id").status_code == 404
    with server.client(world.tokens["superadmin"]) as root:
        assert root.get(f"/pats/{victim}").json()["user_id"] == world.users["member_a"]
        assert root.delete(f"/pats/{victim}").status_code == 204
    with server.client(world.tokens["member_a"]) as gone:
        assert gone.get("/users/me").status_code == 401


def test_names_and_any_case_ids_in_paths(svc) -> None:
    """Item 21: names resolve server side; an upper-case UUID is the same id; unknown and foreign look alike."""
    server, world = svc
    a = world.domains["A"]
    with server.client(world.tokens["superadmin"]) as root:
        assert root.get("/admin/domains/domain-a").json()["id"] == a
        assert root.get(f"/admin/users/{world.users['member_a'].upper()}").json()["name"] == "user-member_a"
        assert root.put("/domains/domain-a/members/user-nonmember", json={"role": "member"}).status_code == 200
        assert root.get("/admin/domains/no-such-domain").status_code == 404
        r = root.post("/admin/users", json={"name": world.users["admin_a"].upper()})
        assert r.status_code == 400                                      # a name may not look like an id
    with server.client(world.tokens["member_a"]) as c:
        by_name = c.get("/proxy/domain-a/v1/models").json()["data"]
        assert by_name == c.get(f"/proxy/{a.upper()}/v1/models").json()["data"] and by_name
        assert c.get("/proxy/domain-a/v1/models/llama3.2:3b").status_code == 200
        unknown, foreign = c.get("/proxy/no-such-domain/v1/models"), c.get("/proxy/domain-b/v1/models")
        assert unknown.status_code == foreign.status_code == 403
        assert unknown.json() == foreign.json()
    with server.client(world.tokens["admin_a"]) as admin:
        unknown, foreign = admin.get("/domains/no-such/members"), admin.get("/domains/domain-b/members")
        assert unknown.status_code == foreign.status_code == 403 and unknown.json() == foreign.json()
        assert [m["user"]["name"] for m in admin.get("/domains/domain-a/members").json()][0] == "user-admin_a"


def test_a_domain_admin_cannot_probe_other_tenants_user_names(svc) -> None:
    """PUT /domains/{d}/members/{name} answered 200 with the user (id, superadmin flag) for any user of the
    platform and 404 for unknown names: a domain admin enumerated every tenant's users by name."""
    server, world = svc
    a = world.domains["A"]
    with server.client(world.tokens["admin_a"]) as admin:
        unknown = admin.put(f"/domains/{a}/members/no-such-user", json={"role": "member"})
        for name in ("user-member_b", "user-superadmin", "user-nonmember"):
            r = admin.put(f"/domains/{a}/members/{name}", json={"role": "member"})
            assert (r.status_code, r.json()) == (unknown.status_code, unknown.json()) and r.status_code == 404, name
        assert [m["user"]["name"] for m in admin.get(f"/domains/{a}/members").json()].count("user-member_b") == 0
        # a member's name still resolves, and a user who shares its id can be added
        assert admin.put(f"/domains/{a}/members/user-member_a", json={"role": "admin"}).json()["role"] == "admin"
        assert admin.put(f"/domains/{a}/members/{world.users['member_b'].upper()}",
                         json={"role": "member"}).status_code == 200
    with server.client(world.tokens["superadmin"]) as root:   # the platform sees the directory
        assert root.put(f"/domains/{a}/members/user-nonmember", json={"role": "member"}).status_code == 200


def test_a_key_minted_with_an_admin_issued_key_stays_visibly_the_admins(svc) -> None:
    """An admin minted a `manage` key for a member, then used it on /users/me/pats: the new key read as self-made
    by the member (issued_by = member), so the admin kept a key that no listing attributed to it."""
    server, world = svc
    a, admin_id, member_id = world.domains["A"], world.users["admin_a"], world.users["member_a"]
    with server.client(world.tokens["admin_a"]) as admin:
        as_member = admin.post(f"/domains/{a}/members/{member_id}/pats",
                               json={"name": "as-member", "scopes": ["manage", "models:read"]}).json()
    with server.client(as_member["token"]) as c:
        laundered = c.post("/users/me/pats", json={"name": "looks-self-made", "scopes": ["models:read"]}).json()
        assert laundered["user_id"] == member_id and laundered["issued_by"] == admin_id
        again = c.post(f"/domains/{a}/members/{member_id}/pats", json={"name": "x", "scopes": ["models:read"]})
        assert again.status_code == 403                                # a member administers nothing
    with server.client(world.tokens["superadmin"]) as root:
        listed = {p["id"]: p["issued_by"] for p in root.get(f"/admin/users/{member_id}/pats").json()}
        assert listed[laundered["id"]] == admin_id
        assert listed[world.pat_ids["member_a"]] == member_id          # the member's own key stays its own
        own = root.post("/users/me/pats", json={"name": "mine", "scopes": ["models:read"]}).json()
        assert own["issued_by"] == world.users["superadmin"]


def test_minting_for_a_non_member_looks_like_minting_for_an_unknown_user(svc) -> None:
    """POST /domains/{d}/members/{name}/pats answered 404 with `param: null` for an unknown name and with
    `param: "user_id"` for any existing user who is no member: another probe of other tenants' user names."""
    server, world = svc
    a = world.domains["A"]
    with server.client(world.tokens["admin_a"]) as admin:
        unknown = admin.post(f"/domains/{a}/members/no-such-user/pats", json={"name": "k"})
        for ref in ("user-member_b", "user-superadmin", world.users["nonmember"]):
            r = admin.post(f"/domains/{a}/members/{ref}/pats", json={"name": "k"})
            assert (r.status_code, r.json(), r.headers.get("x-should-retry")) == (
                unknown.status_code, unknown.json(), unknown.headers.get("x-should-retry")) == (
                404, unknown.json(), None), ref


@pytest.mark.parametrize("loss", ["removed", "demoted", "deleted"])
def test_an_admin_who_loses_the_domain_loses_the_keys_it_minted_there(svc, loss: str) -> None:
    """An admin minted a key for a member (it holds the token), then was removed from the domain, demoted or
    deleted: the key stayed valid, so the former admin went on acting in the domain as the member."""
    server, world = svc
    a, admin_id, member_id = world.domains["A"], world.users["admin_a"], world.users["member_a"]
    with server.client(world.tokens["admin_a"]) as admin:
        kept = admin.post(f"/domains/{a}/members/{member_id}/pats",
                          json={"name": "kept", "scopes": ["manage", "models:read"]}).json()
    with server.client(kept["token"]) as c:                  # and one minted with it (issued by the admin too)
        child = c.post("/users/me/pats", json={"name": "child", "scopes": ["models:read"]}).json()
        assert c.get(f"/proxy/{a}/v1/models").status_code == 200
    with server.client(world.tokens["superadmin"]) as root:
        r = {"removed": lambda: root.delete(f"/domains/{a}/members/{admin_id}"),
             "demoted": lambda: root.put(f"/domains/{a}/members/{admin_id}", json={"role": "member"}),
             "deleted": lambda: root.delete(f"/admin/users/{admin_id}")}[loss]()
        assert r.status_code in (200, 204)
        states = {p["id"]: p["state"] for p in root.get(f"/admin/users/{member_id}/pats").json()}
    assert states[kept["id"]] == states[child["id"]] == "revoked"
    assert states[world.pat_ids["member_a"]] == "active"     # the member's own key is untouched
    for token in (kept["token"], child["token"]):
        with server.client(token) as c:
            assert c.get(f"/proxy/{a}/v1/models").status_code == 401


def test_keys_an_admin_minted_survive_changes_that_keep_its_power(svc) -> None:
    server, world = svc
    a, admin_id, member_id = world.domains["A"], world.users["admin_a"], world.users["member_a"]
    with server.client(world.tokens["admin_a"]) as admin:
        kept = admin.post(f"/domains/{a}/members/{member_id}/pats", json={"name": "kept"}).json()
    with server.client(world.tokens["superadmin"]) as root:
        root.put(f"/domains/{a}/members/{admin_id}", json={"role": "admin"})
        root.put(f"/domains/{world.domains['B']}/members/{admin_id}", json={"role": "member"})
        root.patch(f"/admin/users/{admin_id}", json={"name": "renamed"})
        root.patch(f"/admin/users/{admin_id}", json={"superadmin": True})
        root.patch(f"/admin/users/{admin_id}", json={"superadmin": False})   # still admin of A
    with server.client(kept["token"]) as c:
        assert c.get(f"/proxy/{a}/v1/models").status_code == 200


def test_winding_the_clock_back_does_not_revive_an_expired_key(svc, clock: FakeClock) -> None:
    """The guest's wall clock is the host's to set: winding it back made an expired key valid again."""
    server, world = svc
    with server.client(world.tokens["superadmin"]) as root:
        short = root.post("/users/me/pats", json={"name": "one-day", "expires_in_days": 1}).json()
    clock.advance(days=2)
    with server.client(short["token"]) as c:
        assert c.get("/users/me").status_code == 401
        clock.advance(days=-2)                                          # the host winds the clock back
        r = c.get("/users/me")
        assert r.status_code == 401 and "expired" in r.json()["error"]["message"]


def test_the_clock_floor_survives_a_restart(tmp_path) -> None:
    """After a restart the floor is the latest time the store recorded (a key's last use or revocation)."""
    import asyncio
    from datetime import UTC, timedelta

    from enclave.auth import MonotonicClock
    from enclave.store import Store

    async def scenario() -> tuple[datetime | None, datetime]:
        store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'floor.db'}", row_key=ROW_KEY)
        try:
            user = await store.create_user("u")
            later = datetime.now(UTC) + timedelta(days=3)
            pat = await store.create_pat(user_id=user.id, name="k", token_hash="h" * 64, last4="abcd",
                                         scopes=["models:read"], expires_at=later + timedelta(days=1))
            await store.record_last_used({pat.id: later})
            floor = await store.latest_recorded_time()
            return floor, MonotonicClock(lambda: datetime.now(UTC), floor=floor)()
        finally:
            await store.close()

    floor, now = asyncio.run(scenario())
    assert floor is not None and now == floor
