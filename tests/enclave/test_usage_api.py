"""The usage API and `cube-admin usage` over HTTPS: each role sees exactly its scope, groups, time ranges, bad
parameters, rows edited in the database left out and counted; the CLI's JSON, CSV and table."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from attestation.policy import sim_policy_yaml
from enclave.access import ALL_SCOPES
from enclave.admin_cli import main
from enclave.inference.record import InferenceRecord
from enclave.inference.usage import Usage
from enclave.store import Store
from enclave.tokens import generate_token, token_hash
from enclave.usage import Ledger

from tests.enclave.conftest import PAT_KEY, EnclaveServer, World, sim_provider
from tests.enclave.inference_support import Service, sample, start_service
from tests.enclave.usage_support import made_record

DAY1 = datetime(2026, 11, 29, tzinfo=UTC)
DAY2 = datetime(2026, 11, 30, tzinfo=UTC)


async def more_keys(store: Store, world: World) -> None:
    """A superadmin key bound to domain A, and a second (unbound) key of bound_b's user."""
    for label, user, domain in (("super_bound_a", "superadmin", "A"), ("bound_b_other", "bound_b", None)):
        token = generate_token()
        pat = await store.create_pat(user_id=world.users[user], name=label, token_hash=token_hash(PAT_KEY, token),
                                     last4=token[-4:], scopes=ALL_SCOPES,
                                     expires_at=datetime.now(UTC) + timedelta(days=30),
                                     domain_id=world.domains[domain] if domain else None)
        world.tokens[label], world.pat_ids[label] = token, pat.id


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("usage-api")
    with start_service(tmp, [], setup=more_keys) as service:
        policy = tmp / "sim-policy.yaml"
        policy.write_text(sim_policy_yaml(sim_provider().fingerprint))
        service.server.policy_path = policy   # type: ignore[attr-defined]
        service.seeded = seed(service)        # type: ignore[attr-defined]
        yield service


def put(server: EnclaveServer, records: list[InferenceRecord]) -> None:
    """Hand the records to the running service's ledger (as the gateway's recorder does) and write them."""
    async def go(ledger: Ledger) -> None:
        for r in records:
            ledger.record(r)
        await ledger.flush()
    server.run_async(go(server.ctx.ledger))


def seed(svc: Service) -> dict[str, InferenceRecord]:
    w = svc.world

    def rec(label: str, domain: str, model: str, when: datetime, usage: Usage,
            pat: str | None = None) -> InferenceRecord:
        return made_record(domain=w.domains[domain], user=w.users[label], pat=w.pat_ids[pat or label], model=model,
                           started_at=when.timestamp(), usage=usage)

    records = {
        "a1": rec("member_a", "A", "m1", DAY1 + timedelta(hours=1), Usage(10, 20, 30)),
        "a2": rec("member_a", "A", "m1", DAY1 + timedelta(hours=2), Usage(1, 2, 3, estimated=True)),
        "a3": rec("member_a", "A", "m2", DAY2, Usage(5, 5, 10)),                   # exactly midnight of DAY2
        "a4": rec("admin_a", "A", "m2", DAY2 + timedelta(hours=3), Usage(7, 0, 7)),
        "a5": rec("bound_b", "A", "m1", DAY2 + timedelta(hours=4), Usage(2, 2, 4), pat="bound_b_other"),
        "b1": rec("member_b", "B", "m1", DAY1 + timedelta(hours=5), Usage(100, 200, 300)),
        "b2": rec("bound_b", "B", "m2", DAY2 + timedelta(hours=6), Usage(4, 4, 8, estimated=True)),
    }
    put(svc.server, list(records.values()))
    return records


def get(svc: Service, token: str, path: str, **params: Any) -> httpx.Response:
    with svc.server.client(svc.world.tokens[token]) as c:
        return c.get(path, params={k: v for k, v in params.items() if v is not None})


def ids(answer: dict[str, Any]) -> set[str]:
    return {r["request_id"] for r in answer["data"]}


def names(svc: Service, answer: dict[str, Any], *labels: str) -> bool:
    seeded: dict[str, InferenceRecord] = svc.seeded   # type: ignore[attr-defined]
    return ids(answer) == {seeded[label].request_id for label in labels}


# ---- who sees what ---------------------------------------------------------------------------------------
def test_superadmin_sees_the_platform(svc: Service) -> None:
    r = get(svc, "superadmin", "/admin/usage")
    assert r.status_code == 200, r.text
    body = r.json()
    assert names(svc, body, "a1", "a2", "a3", "a4", "a5", "b1", "b2")
    assert body["totals"] == {"requests": 7, "prompt_tokens": 129, "completion_tokens": 233, "total_tokens": 362,
                              "estimated_requests": 2}
    assert body["integrity_failures"] == 0 and body["has_more"] is False
    first = body["data"][0]   # the newest first
    assert first["request_id"] == svc.seeded["b2"].request_id and first["created_at"] == "2026-11-30T06:00:00Z"
    assert first["estimated"] is True and first["ttft_ms"] == 12 and first["duration_ms"] == 500
    # the bodies' hashes are the receipt's (its key only): to an admin a hash tells which of a few prompts it was
    assert not {"request_sha256", "response_sha256"} & {k for r in body["data"] for k in r}
    b = get(svc, "superadmin", "/admin/usage", domain_id=svc.world.domains["B"]).json()
    assert names(svc, b, "b1", "b2")


def test_platform_usage_refused_to_everyone_else(svc: Service) -> None:
    for token, code in (("super_bound_a", "domain_bound_key"), ("admin_a", "not_superadmin"),
                        ("member_a", "not_superadmin")):
        r = get(svc, token, "/admin/usage")
        assert r.status_code == 403 and r.json()["error"]["code"] == code, (token, r.text)
    assert get(svc, "revoked_a", "/admin/usage").status_code == 401


def test_domain_admin_sees_its_domain_only(svc: Service) -> None:
    a, b = svc.world.domains["A"], svc.world.domains["B"]
    body = get(svc, "admin_a", f"/domains/{a}/usage").json()
    assert names(svc, body, "a1", "a2", "a3", "a4", "a5")
    assert get(svc, "admin_a", "/domains/domain-a/usage").json()["totals"] == body["totals"]   # by name too
    # filters stay inside the domain: B's member and B's key select nothing here
    assert get(svc, "admin_a", f"/domains/{a}/usage", user_id=svc.world.users["member_b"]).json()["data"] == []
    assert get(svc, "admin_a", f"/domains/{a}/usage", pat_id=svc.world.pat_ids["member_b"]).json()["data"] == []
    for token, domain in (("admin_a", b), ("member_a", a), ("member_b", b), ("bound_b", a), ("admin_a", "nope")):
        r = get(svc, token, f"/domains/{domain}/usage")
        assert r.status_code == 403, (token, domain, r.text)
    assert get(svc, "super_bound_a", f"/domains/{a}/usage").status_code == 200   # its own domain
    assert get(svc, "super_bound_a", f"/domains/{b}/usage").status_code == 403   # never outside its binding


def test_a_user_sees_its_own_usage(svc: Service) -> None:
    w = svc.world
    # without the manage scope: this key's requests only
    assert names(svc, get(svc, "member_a", "/users/me/usage").json(), "a1", "a2", "a3")
    r = get(svc, "member_a", "/users/me/usage", user_id=w.users["member_b"])
    assert r.status_code == 403 and r.json()["error"]["code"] == "not_own_usage"
    r = get(svc, "member_a", "/users/me/usage", pat_id=w.pat_ids["admin_a"])
    assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_scope"
    # with it: all of its owner's keys, within the key's domain binding
    assert names(svc, get(svc, "bound_b_other", "/users/me/usage").json(), "a5", "b2")
    assert names(svc, get(svc, "bound_b", "/users/me/usage").json(), "b2")
    assert get(svc, "bound_b", "/users/me/usage", domain_id=w.domains["A"]).json()["data"] == []
    assert get(svc, "admin_a", "/users/me/usage", pat_id=w.pat_ids["member_a"]).json()["data"] == []
    assert get(svc, "nonmember", "/users/me/usage").json()["totals"]["requests"] == 0


# ---- groups, ranges, parameters --------------------------------------------------------------------------
def test_group_by_each_key_and_combined(svc: Service) -> None:
    w = svc.world
    by_model = get(svc, "superadmin", "/admin/usage", group_by="model").json()["data"]
    assert by_model == [
        {"model": "m1", "requests": 4, "prompt_tokens": 113, "completion_tokens": 224, "total_tokens": 337,
         "estimated_requests": 1},
        {"model": "m2", "requests": 3, "prompt_tokens": 16, "completion_tokens": 9, "total_tokens": 25,
         "estimated_requests": 1}]
    by_day = get(svc, "superadmin", "/admin/usage", group_by="day").json()["data"]
    assert [(g["day"], g["requests"], g["total_tokens"]) for g in by_day] == [("2026-11-29", 3, 333),
                                                                              ("2026-11-30", 4, 29)]
    by_user = get(svc, "admin_a", f"/domains/{w.domains['A']}/usage", group_by="user").json()["data"]
    assert {g["user_id"]: g["requests"] for g in by_user} == {w.users["member_a"]: 3, w.users["admin_a"]: 1,
                                                             w.users["bound_b"]: 1}
    by_pat = get(svc, "superadmin", "/admin/usage", group_by="pat").json()["data"]
    assert sum(g["requests"] for g in by_pat) == 7 and len(by_pat) == 5
    combined = get(svc, "superadmin", "/admin/usage", group_by=["model,day"]).json()
    assert combined["group_by"] == ["model", "day"]
    assert [(g["model"], g["day"], g["requests"]) for g in combined["data"]] == [
        ("m1", "2026-11-29", 3), ("m1", "2026-11-30", 1), ("m2", "2026-11-30", 3)]
    repeated = get(svc, "superadmin", "/admin/usage", group_by=["model", "day"]).json()
    assert repeated["data"] == combined["data"]
    by_domain = get(svc, "superadmin", "/admin/usage", group_by="domain").json()["data"]
    assert {g["domain_id"]: g["requests"] for g in by_domain} == {w.domains["A"]: 5, w.domains["B"]: 2}


def test_time_ranges_are_half_open(svc: Service) -> None:
    def got(**params: Any) -> dict[str, Any]:
        r = get(svc, "superadmin", "/admin/usage", **params)
        assert r.status_code == 200, r.text
        return r.json()
    assert names(svc, got(since="2026-11-30"), "a3", "a4", "a5", "b2")          # midnight included
    assert names(svc, got(until="2026-11-30"), "a1", "a2", "b1")                # midnight excluded
    assert names(svc, got(since="2026-11-29T01:00:00Z", until="2026-11-29T02:00:00+00:00"), "a1")
    assert names(svc, got(since="2026-11-29T03:00:00+02:00", until="2026-11-29T04:00:00+02:00"), "a1")  # 01-02Z
    assert got(since="2026-12-01")["totals"]["requests"] == 0
    assert names(svc, got(model="m2", until="2026-11-30T05:00:00Z"), "a3", "a4")


def test_empty_ranges_leap_seconds_and_repeated_keys(svc: Service) -> None:
    empty = get(svc, "superadmin", "/admin/usage", since="2026-11-30", until="2026-11-30").json()
    assert empty["totals"]["requests"] == 0 and empty["data"] == []                # until not after since
    leap = get(svc, "superadmin", "/admin/usage", until="2026-11-29T00:59:60Z").json()   # = 01:00:00Z
    assert leap["until"] == "2026-11-29T01:00:00Z" and leap["totals"]["requests"] == 0
    far = get(svc, "superadmin", "/admin/usage", since="0001-01-01T00:00:00+23:59").json()   # clamped
    assert far["totals"]["requests"] == 7
    twice = get(svc, "superadmin", "/admin/usage", group_by="model,model").json()
    assert twice["group_by"] == ["model"] and len(twice["data"]) == 2


def test_limit_lists_the_newest(svc: Service) -> None:
    body = get(svc, "superadmin", "/admin/usage", limit=2).json()
    assert names(svc, body, "b2", "a5") and body["has_more"] is True and body["totals"]["requests"] == 7


@pytest.mark.parametrize("params, param", [
    ({"since": "yesterday"}, "since"), ({"until": "2026-11-30T00:00:00"}, "until"),
    ({"since": "2026-02-30"}, "since"), ({"since": "2026-13-01"}, "since"),
    ({"since": "2026-11-30T24:00:00Z"}, "since"), ({"model": "m\x01"}, "model"), ({"group_by": "tokens"}, "group_by"),
    ({"user_id": "alice"}, "user_id"), ({"pat_id": "x"}, "pat_id"), ({"limit": 0}, "limit"),
    ({"limit": "many"}, "limit")])
def test_bad_parameters_get_400_envelopes(svc: Service, params: dict[str, Any], param: str) -> None:
    r = get(svc, "superadmin", "/admin/usage", **params)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and param in (error["param"] or "") + error["message"]


def test_an_unknown_parameter_is_a_400_never_a_wider_report(svc: Service) -> None:
    """A misspelt filter (`user=` for `user_id=`, `domain=` on the platform route) was ignored: the report
    covered everything the caller may see, with 200. Now each route takes only its own parameters."""
    w = svc.world
    for token, path, params in (("superadmin", "/admin/usage", {"user": w.users["member_b"]}),
                                ("superadmin", "/admin/usage", {"domain": w.domains["B"]}),
                                ("admin_a", f"/domains/{w.domains['A']}/usage", {"domain_id": w.domains["A"]}),
                                ("member_a", "/users/me/usage", {"": "null"})):
        r = get(svc, token, path, **params)
        assert r.status_code == 400, (path, params, r.text)
        assert r.json()["error"]["code"] == "unknown_parameter" and r.json()["error"]["type"] == "invalid_request_error"
    assert get(svc, "superadmin", "/admin/usage", user_id=w.users["member_b"]).status_code == 200


def test_refusal_comes_before_parameter_errors(svc: Service) -> None:
    assert get(svc, "member_a", "/admin/usage", since="garbage").status_code == 403
    assert get(svc, "admin_a", f"/domains/{svc.world.domains['B']}/usage", limit=0).status_code in (400, 403)


# ---- integrity -------------------------------------------------------------------------------------------
def _edit(svc: Service, sql: str, **params: Any) -> None:
    async def go() -> None:
        async with svc.server.ctx.store.engine.begin() as conn:
            await conn.execute(sa.text(sql), params)
    svc.server.run_async(go())


def test_a_row_edited_in_the_database_is_left_out_and_counted(svc: Service) -> None:
    target = svc.seeded["b1"]
    before = sample(svc.metrics_text(), "cube_store_integrity_failures_total", table="usage_records")
    _edit(svc, "UPDATE usage_records SET total_tokens = 3 WHERE request_id = :id", id=target.request_id)
    try:
        body = get(svc, "superadmin", "/admin/usage", group_by="model").json()
        assert body["integrity_failures"] == 1
        assert body["data"][0] == {"model": "m1", "requests": 3, "prompt_tokens": 13, "completion_tokens": 24,
                                   "total_tokens": 37, "estimated_requests": 1}
        text = svc.metrics_text()
        assert sample(text, "cube_store_integrity_failures_total", table="usage_records") == before + 1
        assert "cube_usage_records_dropped_total 0.0" in text and "cube_usage_records_pending 0.0" in text
        assert get(svc, "admin_a", f"/domains/{svc.world.domains['A']}/usage").json()["integrity_failures"] == 0
    finally:
        _edit(svc, "UPDATE usage_records SET total_tokens = 300 WHERE request_id = :id", id=target.request_id)
    assert get(svc, "superadmin", "/admin/usage").json()["integrity_failures"] == 0   # restored: its MAC holds


def test_records_of_deleted_users_and_domains_stay(tmp_path: Path) -> None:
    with start_service(tmp_path, []) as svc:
        w = svc.world
        put(svc.server, [made_record(domain=w.domains["B"], user=w.users["member_b"], pat=w.pat_ids["member_b"])])
        with svc.server.client(w.tokens["superadmin"]) as c:
            assert c.delete(f"/admin/users/{w.users['member_b']}").status_code == 204
            assert c.delete(f"/admin/domains/{w.domains['B']}").status_code == 204
        body = get(svc, "superadmin", "/admin/usage", user_id=w.users["member_b"]).json()
        assert body["totals"]["requests"] == 1 and body["integrity_failures"] == 0


# ---- cube-admin usage ------------------------------------------------------------------------------------
def cli(svc: Service, token: str, *args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["--url", svc.server.url, "--policy", str(svc.server.policy_path),   # type: ignore[attr-defined]
                 "--token", svc.world.tokens[token], *args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("group", ["pat", "user", "model", "day"])
def test_cli_json_group_by_prints_exactly_the_group_list(svc: Service, group: str,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(svc, "superadmin", "--json", "usage", "--group-by", group, capsys=capsys)
    assert code == 0, err
    printed = json.loads(out)
    assert printed == get(svc, "superadmin", "/admin/usage", group_by=group).json()["data"]
    key = {"pat": "pat_id", "user": "user_id", "model": "model", "day": "day"}[group]
    assert all(set(g) == {key, "requests", "prompt_tokens", "completion_tokens", "total_tokens",
                          "estimated_requests"} for g in printed)
    assert sum(g["total_tokens"] for g in printed) == 362


def test_cli_scopes_filters_csv_and_table(svc: Service, capsys: pytest.CaptureFixture[str]) -> None:
    w = svc.world
    code, out, _ = cli(svc, "admin_a", "usage", "--csv", "--domain", "domain-a", "--group-by", "model",
                       "--group-by", "day", "--since", "2026-11-30", capsys=capsys)
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [(r["model"], r["day"], int(r["requests"]), int(r["total_tokens"])) for r in rows] == [
        ("m1", "2026-11-30", 1, 4), ("m2", "2026-11-30", 2, 17)]
    code, out, _ = cli(svc, "member_a", "usage", "--csv", "--me", "--model", "m1", capsys=capsys)
    listed = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and {r["request_id"] for r in listed} == {svc.seeded["a1"].request_id,
                                                               svc.seeded["a2"].request_id}
    assert "content" not in out and listed[0]["pat_id"] == w.pat_ids["member_a"]
    code, out, err = cli(svc, "superadmin", "usage", "--user", w.users["member_b"], capsys=capsys)
    assert code == 0 and svc.seeded["b1"].request_id in out and "requests 1" in out and "total_tokens 300" in out
    code, _, err = cli(svc, "admin_a", "usage", "--domain", w.domains["B"], capsys=capsys)
    assert code == 1 and "not_a_member" in err
    code, _, err = cli(svc, "admin_a", "usage", capsys=capsys)
    assert code == 1 and "not_superadmin" in err


def test_cli_errors(svc: Service, capsys: pytest.CaptureFixture[str]) -> None:
    """Bad values reach the enclave and come back as its 400, exit 1; `--limit 0` was dropped as falsy and
    listed the default 100 records with exit 0."""
    for args, says in ((("--limit", "0"), "limit"), (("--since", ""), "since"), (("--since", "garbage"), "since"),
                       (("--user", "alice"), "user_id"), (("--domain", "nope"), "domain_not_found")):
        code, out, err = cli(svc, "superadmin", "usage", *args, capsys=capsys)
        assert (code, out) == (1, "") and says in err and "cube-admin:" in err, (args, err)
    code, _, err = cli(svc, "superadmin", "--json", "usage", "--csv", capsys=capsys)
    assert code == 1 and "exclude each other" in err


def test_cli_warns_of_rows_left_out(svc: Service, capsys: pytest.CaptureFixture[str]) -> None:
    target = svc.seeded["a4"]
    _edit(svc, "UPDATE usage_records SET model = 'm1' WHERE request_id = :id", id=target.request_id)
    try:
        code, out, err = cli(svc, "superadmin", "--json", "usage", "--group-by", "model", capsys=capsys)
    finally:
        _edit(svc, "UPDATE usage_records SET model = 'm2' WHERE request_id = :id", id=target.request_id)
    assert code == 0 and "1 usage row(s) failed their integrity check" in err
    assert sum(g["requests"] for g in json.loads(out)) == 6


# ---- PostgreSQL ------------------------------------------------------------------------------------------
def test_usage_api_on_postgres(tmp_path: Path, pg_schema_url: tuple[str, str]) -> None:
    url, schema = pg_schema_url
    with start_service(tmp_path, [], setup=more_keys, database_url=url, database_schema=schema) as svc:
        svc.seeded = seed(svc)   # type: ignore[attr-defined]
        assert names(svc, get(svc, "admin_a", f"/domains/{svc.world.domains['A']}/usage").json(),
                     "a1", "a2", "a3", "a4", "a5")
        assert get(svc, "admin_a", f"/domains/{svc.world.domains['B']}/usage").status_code == 403
        by_day = get(svc, "superadmin", "/admin/usage", group_by="day", since="2026-11-30").json()["data"]
        assert by_day == [{"day": "2026-11-30", "requests": 4, "prompt_tokens": 18, "completion_tokens": 11,
                           "total_tokens": 29, "estimated_requests": 1}]
        _edit(svc, "UPDATE usage_records SET prompt_tokens = 0 WHERE request_id = :id",
              id=svc.seeded["a3"].request_id)
        body = get(svc, "superadmin", "/admin/usage", since="2026-11-30").json()
        assert body["integrity_failures"] == 1 and body["totals"]["requests"] == 3
