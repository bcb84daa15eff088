"""Admin API flows over HTTPS, revocation/expiry on the next request, model pull/remove through FakeOllama."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from enclave.tokens import PAT_PREFIX, parse_token

from tests.enclave.conftest import EnclaveServer, FakeClock, World, make_settings
from tests.enclave.test_service import backends, start_service
from tests.fakes.ollama import FakeOllama
from tests.fakes.vllm import FakeVllm


@pytest.fixture
def svc(tmp_path, clock: FakeClock) -> Iterator[tuple[EnclaveServer, World, FakeOllama, FakeClock]]:
    with FakeOllama() as ollama, FakeVllm() as vllm:
        server, world = start_service(make_settings(tmp_path, backends=backends(ollama, vllm)), clock)
        try:
            yield server, world, ollama, clock
        finally:
            server.stop()


def test_onboarding_flow_and_revocation_on_next_request(svc) -> None:
    server, world, _, _ = svc
    a = world.domains["A"]
    with server.client(world.tokens["superadmin"]) as root:
        user = root.post("/admin/users", json={"name": "carol"}).json()
        assert root.post("/admin/users", json={"name": "carol"}).status_code == 409
        dom = root.post("/admin/domains", json={"name": "research"})
        assert dom.status_code == 201
        member = root.put(f"/domains/{a}/members/{user['id']}", json={"role": "member"}).json()
        assert member["role"] == "member" and member["user"]["name"] == "carol"
        created = root.post(f"/admin/users/{user['id']}/pats", json={"name": "laptop", "scopes": ["models:read"]})
        assert created.status_code == 201
        token = created.json()["token"]
        parse_token(token)
        listed = root.get(f"/admin/users/{user['id']}/pats").json()
        assert len(listed) == 1 and "token" not in listed[0]
        assert listed[0]["display"] == f"{PAT_PREFIX}...{token[-4:]}"
        assert token not in json.dumps(listed)
    with server.client(token) as carol:
        assert carol.get(f"/proxy/{a}/v1/models").status_code == 200            # cached auth now
        assert carol.get("/users/me").json()["memberships"] == {a: "member"}
        assert carol.get("/users/me/pats").status_code == 403                  # no manage scope
        with server.client(world.tokens["superadmin"]) as root:
            pat_id = listed[0]["id"]
            assert root.delete(f"/admin/users/{user['id']}/pats/{pat_id}").status_code == 204
        r = carol.get(f"/proxy/{a}/v1/models")
        assert r.status_code == 401 and "revoked" in r.json()["error"]["message"]


def test_membership_removal_takes_effect_at_once(svc) -> None:
    server, world, _, _ = svc
    a = world.domains["A"]
    with server.client(world.tokens["member_a"]) as member, server.client(world.tokens["admin_a"]) as admin:
        assert member.get(f"/proxy/{a}/v1/models").status_code == 200
        assert admin.delete(f"/domains/{a}/members/{world.users['member_a']}").status_code == 204
        assert member.get(f"/proxy/{a}/v1/models").json()["error"]["code"] == "not_a_member"


def test_expiry_on_the_next_request(svc) -> None:
    server, world, _, clock = svc
    with server.client(world.tokens["superadmin"]) as root:
        token = root.post("/users/me/pats", json={"name": "short", "expires_in_days": 1}).json()["token"]
    with server.client(token) as c:
        path = f"/proxy/{world.domains['A']}/v1/models"
        assert c.get(path).status_code == 200
        clock.advance(days=1, seconds=1)
        r = c.get(path)
        assert r.status_code == 401 and "expired" in r.json()["error"]["message"]


def test_self_service_pats_and_no_escalation(svc) -> None:
    server, world, _, _ = svc
    with server.client(world.tokens["admin_a"]) as me:
        created = me.post("/users/me/pats", json={"name": "ci job", "scopes": ["models:read"],
                                                  "model_allowlist": ["llama3.2:*"]}).json()
        assert created["scopes"] == ["models:read"] and created["state"] == "active"
        assert created["expires_at"] > created["created_at"]
        ids = [p["id"] for p in me.get("/users/me/pats").json()]
        assert created["id"] in ids
        assert me.delete(f"/users/me/pats/{created['id']}").status_code == 204
        states = {p["id"]: p["state"] for p in me.get("/users/me/pats").json()}
        assert states[created["id"]] == "revoked"
        # another user's PAT id looks like an unknown one
        assert me.delete(f"/users/me/pats/{world.pat_ids['member_a']}").status_code == 404
    with server.client(world.tokens["bound_b"]) as bound:
        made = bound.post("/users/me/pats", json={"name": "child"}).json()
        assert made["domain_id"] == world.domains["B"]      # a domain-bound key only makes bound keys
    with server.client(world.tokens["allow_a"]) as c:
        ok = c.post("/users/me/pats", json={"name": "narrow", "scopes": ["models:read"]})
        assert ok.status_code == 201
    with server.client(ok.json()["token"]) as narrow:
        r = narrow.post("/users/me/pats", json={"name": "wider", "scopes": ["manage"]})
        assert r.status_code == 403


def test_domain_admin_manages_members_and_their_pats(svc) -> None:
    server, world, _, _ = svc
    a, b = world.domains["A"], world.domains["B"]
    nonmember = world.users["nonmember"]
    with server.client(world.tokens["admin_a"]) as admin:
        assert admin.put(f"/domains/{a}/members/{nonmember}", json={"role": "member"}).status_code == 200
        names = {m["user"]["name"] for m in admin.get(f"/domains/{a}/members").json()}
        assert "user-nonmember" in names
        pat = admin.post(f"/domains/{a}/members/{nonmember}/pats", json={"name": "issued"}).json()
        assert pat["domain_id"] == a
        assert admin.post(f"/domains/{b}/members/{nonmember}/pats", json={"name": "x"}).status_code == 403
        assert admin.put(f"/domains/{b}/members/{nonmember}", json={"role": "admin"}).status_code == 403
        assert admin.put(f"/domains/{a}/members/{nonmember}", json={"role": "owner"}).status_code == 400
        assert [p["id"] for p in admin.get(f"/domains/{a}/pats").json()] == [pat["id"]]
    with server.client(pat["token"]) as issued:
        assert issued.get(f"/proxy/{a}/v1/models").status_code == 200
        with server.client(world.tokens["admin_a"]) as admin:
            assert admin.delete(f"/domains/{a}/pats/{pat['id']}").status_code == 204
            assert admin.delete(f"/domains/{a}/pats/{world.pat_ids['member_b']}").status_code == 404
        assert issued.get(f"/proxy/{a}/v1/models").status_code == 401


def test_domain_model_allowlist(svc) -> None:
    server, world, _, _ = svc
    b = world.domains["B"]
    with server.client(world.tokens["superadmin"]) as root:
        r = root.patch(f"/admin/domains/{b}", json={"model_allowlist": ["meta-llama/*", "sql-lora"]})
        assert r.status_code == 200 and r.json()["model_allowlist"] == ["meta-llama/*", "sql-lora"]
    with server.client(world.tokens["member_b"]) as c:
        ids = [m["id"] for m in c.get(f"/proxy/{b}/v1/models").json()["data"]]
        assert ids == ["meta-llama/Llama-3.1-8B-Instruct", "sql-lora"]
        assert c.get(f"/proxy/{b}/v1/models/llama3.2:3b").status_code == 404
    with server.client(world.tokens["superadmin"]) as root:
        root.patch(f"/admin/domains/{b}", json={"clear_model_allowlist": True})
    with server.client(world.tokens["member_b"]) as c:
        assert len(c.get(f"/proxy/{b}/v1/models").json()["data"]) == 5


def test_superadmin_cannot_remove_the_last_superadmin(svc) -> None:
    server, world, _, _ = svc
    sa = world.users["superadmin"]
    with server.client(world.tokens["superadmin"]) as root:
        assert root.patch(f"/admin/users/{sa}", json={"superadmin": False}).json()["error"]["code"] == \
            "last_superadmin"
        assert root.delete(f"/admin/users/{sa}").status_code == 409
        other = root.post("/admin/users", json={"name": "second", "superadmin": True}).json()
        assert root.delete(f"/admin/users/{other['id']}").status_code == 204
        assert root.delete(f"/admin/domains/{world.domains['B']}").status_code == 204
        assert root.get(f"/admin/domains/{world.domains['B']}").status_code == 404
    with server.client(world.tokens["member_b"]) as c:   # domain gone: looks like any foreign domain
        assert c.get(f"/proxy/{world.domains['B']}/v1/models").status_code == 403


def test_last_used_is_batched(svc) -> None:
    server, world, _, clock = svc
    with server.client(world.tokens["member_a"]) as c:
        for _ in range(3):
            assert c.get(f"/proxy/{world.domains['A']}/v1/models").status_code == 200
    ctx = server.ctx
    assert server.run_async(ctx.store.get_pat(world.pat_ids["member_a"])).last_used_at is None  # not yet written
    assert ctx.tracker.pending >= 1
    server.run_async(ctx.tracker.flush())
    used = server.run_async(ctx.store.get_pat(world.pat_ids["member_a"])).last_used_at
    assert used == clock()


def test_model_pull_progress_and_remove(svc) -> None:
    server, world, ollama, _ = svc
    a = world.domains["A"]
    with server.client(world.tokens["superadmin"]) as root:
        with root.stream("POST", "/admin/models", json={"backend": "ollama", "model": "qwen2.5:0.5b"}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
            lines = [json.loads(line) for line in r.iter_lines() if line]
        assert lines[0]["status"] == "pulling manifest" and lines[-1] == {"status": "success"}
        assert any("completed" in line and "total" in line for line in lines)
        assert "qwen2.5:0.5b" in [m["id"] for m in root.get(f"/proxy/{a}/v1/models").json()["data"]]
        admin_models = {m["id"]: m for m in root.get("/admin/models").json()}
        assert admin_models["qwen2.5:0.5b"]["backend"] == "ollama"

        with root.stream("POST", "/admin/models", json={"backend": "ollama", "model": "missing:1b"}) as r:
            last = [json.loads(line) for line in r.iter_lines() if line][-1]
        assert last["error"]["code"] in {"model_not_found", "pull_failed"} and last["error"]["message"]

        assert root.post("/admin/models", json={"backend": "nope", "model": "x"}).json()["error"]["code"] == \
            "backend_not_found"
        assert root.post("/admin/models", json={"backend": "vllm", "model": "x"}).json()["error"]["code"] == \
            "unsupported_operation"
        assert root.delete("/admin/models/qwen2.5:0.5b").status_code == 204
        assert "qwen2.5:0.5b" not in [m["id"] for m in root.get(f"/proxy/{a}/v1/models").json()["data"]]
        assert root.delete("/admin/models/qwen2.5:0.5b").status_code == 404
        statuses = {b["name"]: b for b in root.get("/admin/backends").json()}
        assert statuses["ollama"]["up"] and statuses["ollama"]["models"] == 3
    with server.client(world.tokens["admin_a"]) as admin:
        assert admin.post("/admin/models", json={"backend": "ollama", "model": "qwen2.5:0.5b"}).status_code == 403
