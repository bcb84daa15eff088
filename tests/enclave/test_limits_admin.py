"""Who sets which limits: the platform a domain's ceiling and any key's; a domain's admins their members' and
domain-bound keys' within the ceiling, never another domain's; a host-edited limit row refuses the requests it
binds (never "unlimited"); ``cube-admin limits``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from attestation.policy import sim_policy_yaml
from enclave.admin_cli import main

from tests.enclave.conftest import sim_provider
from tests.enclave.inference_support import Service, sample, start_service
from tests.enclave.limits_support import error_of, infer, new_tenant, put_limits
from tests.fakes.vllm import BASE_MODEL, FakeVllm


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with FakeVllm() as vllm:
        with start_service(tmp_path_factory.mktemp("limits-admin"), [({"name": "vllm", "kind": "vllm"}, vllm)],
                           quotas={"sync_seconds": 0.2}) as service:
            yield service


def call(svc: Service, who: str, method: str, path: str, body: object = None):
    with svc.server.client(svc.world.tokens[who]) as c:
        return c.request(method, path, json=body)


def test_a_domain_admin_sets_limits_within_the_ceiling_only(svc: Service) -> None:
    a, member = svc.world.domains["A"], svc.world.users["member_a"]
    assert call(svc, "superadmin", "PUT", f"/admin/domains/{a}/limits",
                {"rpm": 10, "tokens_per_day": 1000}).status_code == 200
    member_path = f"/domains/{a}/members/{member}/limits"
    assert call(svc, "admin_a", "PUT", member_path, {"rpm": 5, "tpm": 99999}).status_code == 200   # no tpm ceiling
    for body, param in (({"rpm": 11}, "rpm"), ({"rpm": "unlimited"}, "rpm"), ({"tokens_per_day": 1001},
                                                                              "tokens_per_day")):
        r = call(svc, "admin_a", "PUT", member_path, body)
        assert r.status_code == 403, (body, r.text)
        assert error_of(r)["code"] == "above_domain_ceiling" and error_of(r)["param"] == param
    got = call(svc, "admin_a", "GET", member_path).json()
    assert got["own"]["rpm"] == 5 and got["effective"]["rpm"] == 5 and got["usage"]["rpm"]["limit"] == 5

    key = call(svc, "admin_a", "POST", f"/domains/{a}/members/{member}/pats", {"name": "bound"}).json()["id"]
    key_path = f"/domains/{a}/pats/{key}/limits"
    assert call(svc, "admin_a", "PUT", key_path, {"rpm": 10, "concurrent": 3}).status_code == 200
    assert call(svc, "admin_a", "PUT", key_path, {"rpm": 20}).status_code == 403
    unbound = svc.world.pat_ids["member_a"]                 # not bound to A: not a domain admin's to limit
    r = call(svc, "admin_a", "PUT", f"/domains/{a}/pats/{unbound}/limits", {"rpm": 1})
    assert r.status_code == 404 and error_of(r)["code"] == "pat_not_found"
    assert call(svc, "superadmin", "PUT", f"/admin/pats/{unbound}/limits", {"rpm": 1000}).status_code == 200
    assert call(svc, "superadmin", "PUT", member_path, {"rpm": 50}).status_code == 200   # the platform may

    assert call(svc, "admin_a", "PUT", f"/admin/domains/{a}/limits", {"rpm": 1000}).status_code == 403
    ceiling = call(svc, "admin_a", "GET", f"/domains/{a}/limits").json()
    assert ceiling["effective"]["rpm"] == 10 and ceiling["subject"] == {"level": "domain", "domain_id": a,
                                                                        "subject_id": None}
    assert call(svc, "member_a", "PUT", member_path, {"rpm": 1}).status_code == 403
    assert call(svc, "member_a", "GET", member_path).status_code == 403
    for path in (member_path, key_path, f"/admin/domains/{a}/limits", f"/admin/pats/{unbound}/limits"):
        assert call(svc, "superadmin", "DELETE", path).status_code == 204
    assert call(svc, "superadmin", "GET", f"/admin/domains/{a}/limits").json()["effective"]["rpm"] is None


def test_another_domain_s_admin_can_neither_set_nor_read(svc: Service) -> None:
    b, member_b = svc.world.domains["B"], svc.world.users["member_b"]
    bound_b = svc.world.pat_ids["bound_b"]
    for method, path in (("GET", f"/domains/{b}/limits"), ("GET", f"/domains/{b}/members/{member_b}/limits"),
                         ("PUT", f"/domains/{b}/members/{member_b}/limits"),
                         ("DELETE", f"/domains/{b}/members/{member_b}/limits"),
                         ("GET", f"/domains/{b}/pats/{bound_b}/limits"), ("PUT", f"/domains/{b}/pats/{bound_b}/limits"),
                         ("GET", f"/admin/domains/{b}/limits"), ("GET", f"/admin/pats/{bound_b}/limits")):
        r = call(svc, "admin_a", method, path, {} if method == "PUT" else None)
        assert r.status_code == 403, (method, path, r.text)
    a = svc.world.domains["A"]
    r = call(svc, "admin_a", "GET", f"/domains/{a}/members/{svc.world.users['nonmember']}/limits")
    assert r.status_code == 404 and error_of(r)["code"] == "member_not_found"
    assert call(svc, "member_b", "GET", f"/users/me/limits?domain={a}").status_code == 403
    assert call(svc, "bound_b", "GET", f"/users/me/limits?domain={a}").status_code == 403   # bound elsewhere


def test_a_user_reads_what_binds_it_and_how_much_is_used(svc: Service) -> None:
    t = new_tenant(svc)
    assert put_limits(svc, f"/admin/domains/{t.domain_id}/limits", rpm=100, tokens_per_month=10**6).status_code == 200
    r = infer(svc, t, model=BASE_MODEL)
    assert r.status_code == 200
    tokens = r.json()["usage"]["total_tokens"]
    with svc.server.client(t.token) as c:
        [mine] = c.get("/users/me/limits").json()         # a bound key: its own domain
    assert mine["domain_id"] == t.domain_id
    with svc.server.client(svc.world.tokens["bound_b"]) as c:   # member of A and B, key bound to B: B only
        assert [e["domain_id"] for e in c.get("/users/me/limits").json()] == [svc.world.domains["B"]]
    with svc.server.client(svc.world.tokens["admin_a"]) as c:   # unbound: every domain of its owner
        assert [e["domain_id"] for e in c.get("/users/me/limits").json()] == [svc.world.domains["A"]]
    assert [s["subject"]["level"] for s in mine["subjects"]] == ["pat", "user", "domain"]
    domain = mine["subjects"][2]
    assert domain["usage"]["rpm"]["used"] == 1 and domain["usage"]["tokens_per_month"]["used"] == tokens
    assert 0 < domain["usage"]["rpm"]["resets_in_seconds"] <= 60
    assert mine["subjects"][0]["usage"] == {}


def _edit_rows(svc: Service, statement: str, **params: object) -> None:
    async def run() -> None:
        engine = create_async_engine(svc.server.settings.effective_database_url())
        async with engine.begin() as conn:
            await conn.execute(sa.text(statement), params)
        await engine.dispose()

    asyncio.run(run())
    svc.server.run_async(svc.server.ctx.quotas.refresh())


def test_a_host_edited_limit_row_refuses_the_requests_it_binds(svc: Service) -> None:
    t = new_tenant(svc)
    assert put_limits(svc, f"/admin/pats/{t.pat_id}/limits", rpm=5).status_code == 200
    before = sample(svc.metrics_text(), "cube_store_integrity_failures_total", table="quota_limits")
    for edit in ("UPDATE quota_limits SET rpm = 1000000 WHERE subject_id = :pat",
                 "UPDATE quota_limits SET rpm = NULL WHERE subject_id = :pat",
                 "UPDATE quota_limits SET mac = NULL WHERE subject_id = :pat"):
        _edit_rows(svc, edit, pat=t.pat_id)
        r = infer(svc, t, model=BASE_MODEL)
        assert r.status_code == 503 and error_of(r)["code"] == "limit_integrity_failure", (edit, r.text)
        assert r.headers["x-should-retry"] == "false"
        got = put_limits(svc, f"/admin/pats/{t.pat_id}/limits", rpm=5)        # set again: valid again
        assert got.status_code == 200
        assert infer(svc, t, model=BASE_MODEL).status_code == 200
    _edit_rows(svc, "UPDATE quota_limits SET rpm = 7 WHERE subject_id = :pat", pat=t.pat_id)
    with svc.server.client(svc.world.tokens["superadmin"]) as c:
        r = c.get(f"/admin/pats/{t.pat_id}/limits")
    assert r.status_code == 503 and error_of(r)["code"] == "limit_integrity_failure"
    # a row the host inserts (no MAC) for a subject without one refuses that subject too
    other = new_tenant(svc)
    _edit_rows(svc, "INSERT INTO quota_limits (subject_kind, domain_id, subject_id, updated_at) "
                    "VALUES ('pat', '', :pat, CURRENT_TIMESTAMP)", pat=other.pat_id)
    assert infer(svc, other, model=BASE_MODEL).status_code == 503
    after = sample(svc.metrics_text(), "cube_store_integrity_failures_total", table="quota_limits")
    assert after > before
    with svc.server.client(svc.world.tokens["superadmin"]) as c:
        assert c.delete(f"/admin/pats/{other.pat_id}/limits").status_code == 204
        assert c.delete(f"/admin/pats/{t.pat_id}/limits").status_code == 204
    assert infer(svc, other, model=BASE_MODEL).status_code == 200


def test_cube_admin_limits(svc: Service, tmp_path, capsys) -> None:
    policy = tmp_path / "sim-policy.yaml"
    policy.write_text(sim_policy_yaml(sim_provider().fingerprint))
    t = new_tenant(svc)

    def cli(*args: str, who: str = "superadmin") -> tuple[int, str, str]:
        code = main(["--url", svc.server.url, "--policy", str(policy), "--token", svc.world.tokens[who], *args])
        out = capsys.readouterr()
        return code, out.out, out.err

    code, out, _ = cli("--json", "limits", "set", "--domain", t.domain_id, "--rpm", "20", "--tokens-per-day",
                       "unlimited")
    assert code == 0
    doc = json.loads(out)
    assert doc["own"]["rpm"] == 20 and doc["own"]["tokens_per_day"] == "unlimited" and doc["own"]["tpm"] is None
    code, out, _ = cli("--json", "limits", "set", "--domain", t.domain_id, "--member", t.user_id, "--rpm", "5")
    assert code == 0 and json.loads(out)["effective"]["rpm"] == 5
    code, out, _ = cli("--json", "limits", "set", "--domain", t.domain_id, "--pat", t.pat_id, "--concurrent", "2")
    assert code == 0 and json.loads(out)["subject"] == {"level": "pat", "domain_id": None, "subject_id": t.pat_id}
    code, out, _ = cli("limits", "show", "--domain", t.domain_id)
    assert code == 0 and "rpm" in out and "20" in out and "tokens_per_month" in out
    code, out, _ = cli("--json", "limits", "show", "--domain", t.domain_id, "--member", t.user_id)
    assert json.loads(out)["usage"]["rpm"]["used"] == 0
    code, _, err = cli("limits", "set", "--domain", t.domain_id, "--member", t.user_id, "--rpm", "21",
                       who="admin_a")
    assert code == 1 and "403" in err
    code, out, _ = cli("--json", "limits", "clear", "--domain", t.domain_id, "--member", t.user_id)
    assert code == 0
    code, out, _ = cli("--json", "limits", "show", "--domain", t.domain_id, "--member", t.user_id)
    assert json.loads(out)["own"]["rpm"] is None
    code, out, _ = cli("--json", "limits", "show", "--mine", "--domain", svc.world.domains["A"], who="member_a")
    assert code == 0 and len(json.loads(out)[0]["subjects"]) == 3
    assert cli("limits", "set", "--rpm", "1")[0] == 1           # nothing named
