"""Every admin route leaves an audit entry, allowed or refused; authentication refusals are counted by class,
never with the token (issue 11 item 5).

The audited routes are enumerated from the app (``app.routes`` filtered by ``enclave.audit.is_audited``), so a
route added later is called here too; its concrete path and body come from test_route_access.ROUTES, which
every route must have an entry in already.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from fastapi.routing import iter_route_contexts

from attestation.policy import sim_policy_yaml
from attestation.providers.sim import SimProvider
from enclave.admin_cli import main as cube_admin
from enclave.audit import is_audited
from tests.enclave.audit_support import verify
from tests.enclave.conftest import EnclaveServer, sim_provider
from tests.enclave.test_route_access import ROUTES, MatrixWorld, Who, everyone, matrix  # noqa: F401 (fixture)

SUPER = Who("superadmin", None, "all")


def refused_caller(method: str, route: str) -> Who | None:
    """An authenticated caller the route refuses (None for routes every key may call, e.g. GET /users/me)."""
    rule = ROUTES[(method, route)][0]
    return next((who for who in everyone() if who.role is not None and not rule(who)), None)


def audited_routes(app) -> list[tuple[str, str]]:
    found = {(m, r.path) for r in iter_route_contexts(app.routes) for m in (r.methods or {"GET"})
             if m != "HEAD" and is_audited(r.path)}
    return sorted(found)


@pytest.fixture
def served(matrix) -> tuple[EnclaveServer, MatrixWorld]:
    """test_route_access's world (its routes' concrete paths name its ids), served over SQLite."""
    return matrix


def entries(server: EnclaveServer) -> list[dict]:
    async def read() -> list[dict]:
        return [e.entry async for e in server.ctx.audit.chain.entries()]
    return server.run_async(read())


def _call(server: EnclaveServer, world: MatrixWorld, who: Who | None, method: str, route: str, n: int):
    _, template, body = ROUTES[(method, route)]
    path = template.format(n=n, spare=world.spares.get(who, "-"), **world.ids)
    payload = {k: v.format(n=n) if isinstance(v, str) else v for k, v in body.items()} \
        if isinstance(body, dict) else body
    token = world.tokens.get(who) if who is not None else None
    with server.client(token) as client:
        return client.request(method, path, json=payload)


def test_the_rule_covers_the_admin_api_and_spares_the_rest(served) -> None:
    server, _ = served
    routes = {path for _, path in audited_routes(server.app)}
    assert {"/admin/users", "/domains/{domain_id}/members", "/users/me", "/pats/{pat_id}",
            "/admin/audit/export"} <= routes
    assert not {p for p in routes if p.startswith(("/proxy/", "/health", "/ready", "/metrics", "/docs",
                                                   "/.well-known/"))}


def test_every_admin_route_leaves_an_entry_allowed_or_refused(served) -> None:
    server, world = served
    counter = itertools.count(10_000)
    missing: list[str] = []
    for method, route in audited_routes(server.app):
        assert (method, route) in ROUTES, f"{method} {route}: add it to test_route_access.ROUTES"
        action = f"{method} {route}"
        refused = refused_caller(method, route)
        for who in (SUPER, refused) if refused else (SUPER,):
            before = len(entries(server))
            r = _call(server, world, who, method, route, next(counter))
            after = entries(server)[before:]
            mine = [e for e in after if e["kind"] == "admin" and e["action"] == action]
            if not mine:
                missing.append(f"{who.label} {action} -> {r.status_code}: no entry")
                continue
            entry = mine[-1]
            if entry["outcome"] != r.status_code or entry["source"] != "127.0.0.1" \
                    or not entry["actor"]["user_id"] or not entry["actor"]["pat_id"]:
                missing.append(f"{who.label} {action}: wrong entry {entry}")
            if who is refused and r.status_code not in (403, 404):
                missing.append(f"{who.label} {action}: expected a refusal, got {r.status_code}")
    assert not missing, "\n".join(missing)


def test_unauthenticated_calls_are_counted_by_class_never_with_the_token(served, tmp_path: Path) -> None:
    server, world = served
    bogus = "cube_pat_" + "Q" * 40   # well-formed prefix, bad checksum
    revoked_like = world.tokens[SUPER][:-4] + "zzzz"
    calls = [(None, "missing"), ("Bearer " + bogus, None), ("Basic abc", "malformed"), ("Bearer " + revoked_like, None)]
    for method, route in audited_routes(server.app):
        for header, _ in calls:
            _, template, body = ROUTES[(method, route)]
            path = template.format(n=1, spare="-", **world.ids)
            with server.client() as client:   # with a body: refused before routing, on the headers alone
                headers = {"Authorization": header} if header else {}
                r = client.request(method, path, headers=headers, json=body)
            assert r.status_code == 401, (method, path, r.status_code)
    server.run_async(server.ctx.audit.flush_refusals())
    refusals = [e for e in entries(server) if e["kind"] == "auth_refused"]
    classes = {e["class"] for e in refusals}
    assert {"missing", "malformed"} <= classes and len(classes) >= 3, classes
    seen_actions = set().union(*(e["actions"].keys() for e in refusals))
    for method, route in audited_routes(server.app):
        assert f"{method} {route}" in seen_actions, f"{method} {route}: its refusals were not counted"
    # one entry per class and source for the whole burst, with the count
    per_key = [(e["class"], e["source"]) for e in refusals]
    assert len(per_key) == len(set(per_key))
    assert sum(e["count"] for e in refusals) >= len(calls) * len(audited_routes(server.app))
    # never the token, in the database or in the export
    with server.client(world.tokens[SUPER]) as client:
        export = client.get("/admin/audit/export")
    assert export.status_code == 200
    database = Path(server.settings.effective_database_url().split(":///", 1)[1])
    stored = b"".join(p.read_bytes() for p in database.parent.glob(database.name + "*"))
    for secret in (bogus, revoked_like, *world.tokens.values()):
        assert secret.encode() not in stored
        assert secret not in export.text
        assert secret[len("cube_pat_"):][:16] not in export.text


def test_a_token_in_a_path_is_redacted(served) -> None:
    server, world = served
    token = world.tokens[SUPER]
    with server.client(token) as client:
        r = client.get(f"/pats/{token}")
        assert r.status_code in (404, 422)
        r2 = client.get(f"/admin/users/{token.upper()}")
    (entry,) = [e for e in entries(server)[-2:] if e.get("action") == "GET /pats/{pat_id}"]
    assert entry["target"] == {"pat_id": "[redacted]"} and entry["outcome"] == r.status_code
    assert entries(server)[-1]["target"] == {"user_id": "[redacted]"} and entries(server)[-1]["outcome"] == r2.status_code
    assert token not in json.dumps(entries(server))


def test_an_entry_that_cannot_be_written_fails_the_response(served, monkeypatch) -> None:
    server, world = served
    trail = server.ctx.audit

    async def unavailable(fields: dict) -> None:
        trail.metrics.write_failures.inc()
        raise OSError("disk full")

    monkeypatch.setattr(trail, "record_admin", unavailable)
    failures = trail.metrics.write_failures._value.get()
    with server.client(world.tokens[SUPER]) as client:
        r = client.get("/admin/users")
    assert r.status_code == 500 and r.json()["error"]["code"] == "audit_unavailable"
    assert "x-request-id" in r.headers
    assert trail.metrics.write_failures._value.get() == failures + 1


def test_cube_admin_exports_over_attested_tls(served, tmp_path: Path, capsys) -> None:

    server, world = served
    policy = tmp_path / "sim-policy.yaml"
    policy.write_text(sim_policy_yaml(sim_provider().fingerprint))
    out = tmp_path / "audit.jsonl"
    common = ["--url", server.url, "--policy", str(policy)]
    assert cube_admin([*common, "--token", world.tokens[SUPER], "audit", "export", "-o", str(out)]) == 0
    signer_platform = SimProvider(server.settings.attestation.sim_dir or server.settings.data_dir / "sim")
    signer_policy = tmp_path / "signer-policy.yaml"   # this app signs with its own simulated platform's key
    signer_policy.write_text(sim_policy_yaml(signer_platform.fingerprint))
    status, report = verify(out, signer_policy)
    assert status == 0 and report["last_seq"] == len(entries(server)), report
    member = next(w for w in world.tokens if w.role == "member" and w.scopes == "all" and w.bound is None)
    assert cube_admin([*common, "--token", world.tokens[member], "audit", "export"]) == 1
    assert "403" in capsys.readouterr().err


def test_a_failing_handler_is_recorded_with_outcome_500(served, monkeypatch) -> None:
    server, world = served

    async def broken() -> list:
        raise RuntimeError("database gone")

    monkeypatch.setattr(server.ctx.store, "list_domains", broken)
    with server.client(world.tokens[SUPER]) as client:
        r = client.get("/admin/domains")
    assert r.status_code == 500
    last = entries(server)[-1]
    assert last["action"] == "GET /admin/domains" and last["outcome"] == 500


def test_a_token_without_its_prefix_in_a_path_is_redacted(served) -> None:
    """The prefix is public, so what follows it is the whole secret: a path holding only that was recorded as
    it came (found in review: the redaction looked for the prefix alone)."""
    server, world = served
    token = world.tokens[SUPER]
    secret = token[len("cube_pat_"):]
    with server.client(token) as client:
        for path in (f"/pats/{secret}", f"/admin/users/key-{secret}-x", f"/admin/users/{'a' * 150}{secret}"):
            client.get(path)
            last = entries(server)[-1]
            assert last["kind"] == "admin" and list(last["target"].values()) == ["[redacted]"], (path, last)
        off = secret[:-1] + ("Z" if secret[-1] != "Z" else "Y")   # one character off: its checksum fails
        client.get(f"/admin/users/{off}")
        assert entries(server)[-1]["target"] == {"user_id": off}
    assert secret not in json.dumps(entries(server))


def test_a_later_route_named_like_a_public_one_is_audited(tmp_path: Path) -> None:
    """The rule spared every path *starting* with /health, /ready, /metrics, /docs ...: a route added later as
    /metrics-settings or /readyz was silently not audited."""
    from fastapi import APIRouter, Depends

    from enclave.api.context import authenticated
    from tests.enclave.audit_support import seeded, signer

    router = APIRouter()

    @router.post("/metrics-settings")
    async def change(principal=Depends(authenticated)) -> dict:
        return {"changed": True}

    assert is_audited("/metrics-settings") and is_audited("/readyz") and is_audited("/healthcheck/{x}")
    assert not {p for p in ("/health", "/ready", "/metrics", "/docs", "/docs/static", "/openapi.json", "/redoc")
                if is_audited(p)}
    settings, world = seeded(tmp_path / "enclave")
    server = EnclaveServer(settings, signer=signer(), extra_routers=[router]).start()
    try:
        with server.client(world.tokens["superadmin"]) as client:
            assert client.post("/metrics-settings").status_code == 200
        last = entries(server)[-1]
        assert last["kind"] == "admin" and last["action"] == "POST /metrics-settings" and last["outcome"] == 200
    finally:
        server.stop()
