"""The running service over real HTTPS: openai-python, the domain isolation matrix, revocation, bad inputs."""

from __future__ import annotations

import asyncio
from datetime import timedelta
import socket
import ssl
import uuid
from collections.abc import Iterator
from typing import Any

import httpx2
import openai
import pytest

from enclave.config import Settings
from enclave.store import Store
from enclave.tokens import generate_token

from tests.enclave.conftest import SERVER_SECRET, EnclaveServer, FakeClock, World, make_settings, seed_world, PAT_KEY, ROW_KEY
from tests.fakes.ollama import FakeOllama
from tests.fakes.vllm import FakeVllm

ALL_MODELS = sorted(["llama3.2:3b", "jdoe/tinyllama:1.1b", "hf.co/bartowski/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M",
                     "meta-llama/Llama-3.1-8B-Instruct", "sql-lora"])


def backends(ollama: FakeOllama, vllm: FakeVllm) -> list[dict[str, Any]]:
    return [{"name": "ollama", "kind": "ollama", "base_url": ollama.base_url},
            {"name": "vllm", "kind": "vllm", "base_url": vllm.base_url}]


def start_service(settings: Settings, clock: FakeClock) -> tuple[EnclaveServer, World]:
    async def seed() -> World:
        store = await Store.open(settings.effective_database_url(), row_key=ROW_KEY)
        try:
            return await seed_world(store, PAT_KEY, clock())
        finally:
            await store.close()

    world = asyncio.run(seed())
    return EnclaveServer(settings, clock=clock).start(), world


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EnclaveServer, World, FakeOllama, FakeVllm]]:
    with FakeOllama() as ollama, FakeVllm() as vllm:
        settings = make_settings(tmp_path_factory.mktemp("svc"), backends=backends(ollama, vllm))
        server, world = start_service(settings, FakeClock())
        try:
            yield server, world, ollama, vllm
        finally:
            server.stop()


def openai_client(server: EnclaveServer, domain_id: str, token: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/proxy/{domain_id}/v1", api_key=token,
                         http_client=httpx2.Client(verify=server.client_ssl()))


# ---- openai-python ------------------------------------------------------------------------------------
def test_openai_list_and_retrieve(service) -> None:
    server, world, _, _ = service
    client = openai_client(server, world.domains["A"], world.tokens["member_a"])
    models = client.models.list()
    assert sorted(m.id for m in models) == ALL_MODELS
    by_id = {m.id: m for m in models}
    assert by_id["llama3.2:3b"].owned_by == "library"
    assert by_id["meta-llama/Llama-3.1-8B-Instruct"].model_extra["max_model_len"] == 131072
    card = client.models.retrieve("hf.co/bartowski/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M")
    assert card.id == "hf.co/bartowski/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M" and card.object == "model"
    with pytest.raises(openai.NotFoundError) as nf:
        client.models.retrieve("no-such-model:1b")
    assert nf.value.body["code"] == "model_not_found" and nf.value.body["param"] == "model"
    assert "`no-such-model:1b` does not exist or you do not have access to it" in nf.value.body["message"]


def test_openai_auth_errors_are_not_retried(service) -> None:
    server, world, _, _ = service
    failures = server.app.state.metrics.auth_failures
    before = failures.labels(reason="revoked")._value.get()
    client = openai_client(server, world.domains["A"], world.tokens["revoked_a"])
    with pytest.raises(openai.AuthenticationError) as err:
        client.models.list()
    assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
    # max_retries defaults to 2: exactly one request must have reached the server
    assert failures.labels(reason="revoked")._value.get() == before + 1
    forbidden = openai_client(server, world.domains["B"], world.tokens["member_a"])
    with pytest.raises(openai.PermissionDeniedError):
        forbidden.models.list()


def test_not_permitted_model_is_indistinguishable_from_unknown(service) -> None:
    server, world, _, _ = service
    with server.client(world.tokens["allow_a"]) as c:
        listed = c.get(f"/proxy/{world.domains['A']}/v1/models").json()
        assert [m["id"] for m in listed["data"]] == ["llama3.2:3b"]
        hidden = c.get(f"/proxy/{world.domains['A']}/v1/models/sql-lora")
        unknown = c.get(f"/proxy/{world.domains['A']}/v1/models/nope")
    assert hidden.status_code == unknown.status_code == 404
    assert hidden.json()["error"]["message"].replace("sql-lora", "X") == \
        unknown.json()["error"]["message"].replace("nope", "X")


# ---- isolation matrix ---------------------------------------------------------------------------------
def _bad_checksum(token: str) -> str:
    last = token[-1]
    return token[:-1] + ("A" if last != "A" else "B")


ENDPOINTS = ("list", "retrieve", "members", "domain_pats")
#               label         A: list ret mem pats   B: list ret mem pats   unknown domain
MATRIX = {
    "superadmin": ((200, 200, 200, 200), (200, 200, 200, 200), (404, 404, 404, 404)),
    "admin_a":    ((200, 200, 200, 200), (403, 403, 403, 403), (403, 403, 403, 403)),
    "member_a":   ((200, 200, 403, 403), (403, 403, 403, 403), (403, 403, 403, 403)),
    "noscope_a":  ((403, 403, 403, 403), (403, 403, 403, 403), (403, 403, 403, 403)),
    "nonmember":  ((403, 403, 403, 403), (403, 403, 403, 403), (403, 403, 403, 403)),
    "member_b":   ((403, 403, 403, 403), (200, 200, 403, 403), (403, 403, 403, 403)),
    "bound_b":    ((403, 403, 403, 403), (200, 200, 403, 403), (403, 403, 403, 403)),
    "revoked_a":  ((401,) * 4, (401,) * 4, (401,) * 4),
    "expired_a":  ((401,) * 4, (401,) * 4, (401,) * 4),
    "unknown":    ((401,) * 4, (401,) * 4, (401,) * 4),
    "malformed":  ((401,) * 4, (401,) * 4, (401,) * 4),
    "checksum":   ((401,) * 4, (401,) * 4, (401,) * 4),
    "missing":    ((401,) * 4, (401,) * 4, (401,) * 4),
    "basic":      ((401,) * 4, (401,) * 4, (401,) * 4),
}


def _headers(world: World, label: str) -> dict[str, str]:
    special = {"unknown": f"Bearer {generate_token()}", "malformed": "Bearer sk-not-a-cube-token",
               "checksum": f"Bearer {_bad_checksum(world.tokens['member_a'])}", "missing": None,
               "basic": "Basic dXNlcjpwYXNz"}
    value = special[label] if label in special else f"Bearer {world.tokens[label]}"
    return {"Authorization": value} if value else {}


def _path(endpoint: str, domain: str) -> str:
    return {"list": f"/proxy/{domain}/v1/models", "retrieve": f"/proxy/{domain}/v1/models/llama3.2:3b",
            "members": f"/domains/{domain}/members", "domain_pats": f"/domains/{domain}/pats"}[endpoint]


@pytest.mark.parametrize("label", sorted(MATRIX))
def test_isolation_matrix(service, label: str) -> None:
    server, world, _, _ = service
    domains = (world.domains["A"], world.domains["B"], str(uuid.uuid4()))
    with server.client() as c:
        for domain, expected_row in zip(domains, MATRIX[label]):
            for endpoint, expected in zip(ENDPOINTS, expected_row):
                r = c.get(_path(endpoint, domain), headers=_headers(world, label))
                where = f"{label} {endpoint} {domain}"
                assert r.status_code == expected, f"{where}: {r.status_code} {r.text}"
                body = r.json()
                if expected >= 400:
                    assert set(body["error"]) == {"message", "type", "param", "code"}, where
                if expected == 401:
                    assert body["error"]["code"] == "invalid_api_key", where
                    assert r.headers["www-authenticate"].startswith("Bearer"), where
                    assert r.headers["x-should-retry"] == "false", where
                if expected == 403:
                    assert body["error"]["code"] in {"not_a_member", "insufficient_scope", "not_domain_admin"}, where
                    assert r.headers["x-should-retry"] == "false", where


def test_forbidden_reasons(service) -> None:
    server, world, _, _ = service
    a = world.domains["A"]
    with server.client() as c:
        def code(label: str, path: str) -> str:
            return c.get(path, headers=_headers(world, label)).json()["error"]["code"]
        assert code("noscope_a", f"/proxy/{a}/v1/models") == "insufficient_scope"
        assert code("nonmember", f"/proxy/{a}/v1/models") == "not_a_member"
        assert code("member_a", f"/domains/{a}/members") == "insufficient_scope"
        assert code("allow_a", f"/domains/{a}/members") == "not_domain_admin"
        assert code("bound_b", f"/proxy/{a}/v1/models") == "not_a_member"


def test_platform_admin_routes_need_superadmin(service) -> None:
    server, world, _, _ = service
    with server.client() as c:
        for label in ("admin_a", "member_a", "nonmember", "bound_b"):
            for path in ("/admin/users", "/admin/domains", "/admin/models", "/admin/backends"):
                r = c.get(path, headers=_headers(world, label))
                assert r.status_code == 403, (label, path, r.text)
        assert c.get("/admin/users", headers=_headers(world, "superadmin")).status_code == 200
        assert c.get("/admin/users", headers=_headers(world, "expired_a")).status_code == 401


# ---- bad inputs ---------------------------------------------------------------------------------------
def test_bad_inputs_get_4xx_envelopes(service) -> None:
    server, world, _, _ = service
    sa = {"Authorization": f"Bearer {world.tokens['superadmin']}"}
    a = world.domains["A"]
    cases: list[tuple[str, str, dict[str, Any], int, str]] = [
        ("GET", "/nope", {}, 404, "not_found"),
        ("DELETE", "/health", {}, 405, "method_not_allowed"),
        ("GET", "/proxy/not-a-domain/v1/models", {}, 404, "domain_not_found"),   # ids or names
        ("GET", "/admin/users/123", {}, 404, "user_not_found"),
        ("GET", "/admin/users/" + "x" * 101, {}, 400, "invalid_value"),
        ("POST", "/admin/domains", {"content": b'{"name": "x",', "headers": {"content-type": "application/json"}},
         400, "invalid_json"),
        ("POST", "/admin/domains", {"json": {"name": "ok", "colour": "red"}}, 400, "unknown_field"),
        ("POST", "/admin/domains", {"json": {"name": ""}}, 400, "invalid_value"),
        ("POST", "/admin/domains", {"json": ["not", "an", "object"]}, 400, "invalid_value"),
        ("POST", "/admin/users", {"json": {"name": "x" * 500}}, 400, "invalid_value"),
        ("POST", "/users/me/pats", {"json": {"name": "t", "expires_in_days": 400}}, 400, "expiry_too_long"),
        ("POST", "/users/me/pats", {"json": {"name": "t", "expires_in_days": 10_000}}, 400, "invalid_value"),
        ("POST", "/users/me/pats", {"json": {"name": "t", "expires_in_days": "30"}}, 400, "invalid_value"),
        ("POST", "/users/me/pats", {"json": {"name": "t", "scopes": ["root"]}}, 400, "invalid_value"),
        ("POST", "/admin/domains", {"content": b"x" * 2_000_000, "headers": {"content-type": "application/json"}},
         413, "body_too_large"),
        ("GET", "/health", {"headers": {"x-big": "a" * 20_000}}, 431, "headers_too_large"),
        ("GET", f"/proxy/{a}/v1/models", {"headers": {"Authorization": "Bearer " + "A" * 5000}}, 401,
         "invalid_api_key"),
    ]
    with server.client() as c:
        for method, path, kw, status, code in cases:
            headers = {**sa, **kw.pop("headers", {})}
            r = c.request(method, path, headers=headers, **kw)
            assert r.status_code == status, (method, path, r.status_code, r.text)
            err = r.json()["error"]
            assert err["code"] == code and err["message"], (path, err)
            assert set(err) == {"message", "type", "param", "code"}


def test_chunked_oversized_body_is_refused(service) -> None:
    server, world, _, _ = service

    def chunks() -> Iterator[bytes]:
        for _ in range(40):
            yield b"x" * 65536

    with server.client(world.tokens["superadmin"]) as c:
        r = c.post("/admin/domains", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


def test_bad_input_never_reaches_the_catch_all(service) -> None:
    """After the bad inputs (again here, so the test stands alone) the metrics show no 500 at all."""
    server, world, _, _ = service
    test_bad_inputs_get_4xx_envelopes(service)
    with server.client() as c:
        c.get(f"/proxy/{world.domains['A']}/v1/models", headers=_headers(world, "checksum"))
        c.get(f"/proxy/{world.domains['A']}/v1/models", headers=_headers(world, "member_a"))
        text = c.get("/metrics", headers=_headers(world, "superadmin")).text
    assert 'status="500"' not in text
    assert 'cube_http_requests_total{method="GET",route="/proxy/{domain_id}/v1/models",status="200"}' in text
    assert 'cube_http_requests_total{method="POST",route="/admin/domains",status="400"}' in text
    assert 'cube_auth_failures_total{reason="bad_checksum"}' in text


# ---- operations ---------------------------------------------------------------------------------------
def test_health_ready_metrics(service) -> None:
    server, world, ollama, _ = service
    with server.client() as c:
        assert c.get("/health").json() == {"status": "ok"}
        ready = c.get("/ready")
        assert ready.status_code == 200 and ready.json() == {"status": "ready"}
    with server.client(world.tokens["superadmin"]) as c:
        ready = c.get("/ready")
        assert ready.status_code == 200 and ready.json()["status"] == "ready"
        assert {b["name"] for b in ready.json()["backends"]} == {"ollama", "vllm"}
        metrics = c.get("/metrics").text
        assert 'cube_backend_up{backend="ollama",kind="ollama"} 1.0' in metrics
        assert "cube_registry_models 5.0" in metrics


def test_readiness_reasons_and_metrics_need_an_operator_key(service) -> None:
    """Backend error text (internal URLs, upstream excerpts) and metrics are for operators only: anyone else
    gets the status word from /ready and a refusal from /metrics."""
    server, world, ollama, _ = service
    bound = generate_token()

    async def bound_superadmin_key() -> None:
        from enclave.access import ALL_SCOPES
        from enclave.tokens import token_hash

        await server.ctx.store.create_pat(user_id=world.users["superadmin"], name="bound", scopes=ALL_SCOPES,
                                          token_hash=token_hash(PAT_KEY, bound), last4=bound[-4:],
                                          expires_at=server.ctx.clock() + timedelta(days=1),
                                          domain_id=world.domains["A"])

    server.run_async(bound_superadmin_key())
    try:
        ollama.answering = False
        server.run_async(server.ctx.registry.refresh())
        with server.client() as c:
            public = c.get("/ready")
            assert public.status_code == 200 and public.json() == {"status": "ready"}
            assert ollama.base_url not in public.text
            assert c.get("/metrics").status_code == 401
        for label, status in (("member_a", 403), ("admin_a", 403), ("bound_b", 403), ("revoked_a", 401)):
            with server.client(world.tokens[label]) as c:
                assert c.get("/ready").status_code == status, label
                assert c.get("/metrics").status_code == status, label
        with server.client(bound) as c:   # a superadmin's key bound to a domain is not an operator's
            assert c.get("/ready").json()["error"]["code"] == "domain_bound_key"
            assert c.get("/metrics").status_code == 403
        with server.client(world.tokens["superadmin"]) as c:
            down = {b["name"]: b for b in c.get("/ready").json()["backends"]}["ollama"]
            assert down["up"] is False and down["error"]
    finally:
        ollama.answering = True
        server.run_async(server.ctx.registry.refresh())


def test_ready_while_any_backend_serves(service) -> None:
    """One backend down while another serves: still ready (the down one reported to operators); all down: 503."""
    server, world, ollama, vllm = service
    token = world.tokens["member_a"]
    path = f"/proxy/{world.domains['A']}/v1/models"
    try:
        ollama.answering = False
        server.run_async(server.ctx.registry.refresh())
        with server.client(token) as c:
            ids = [m["id"] for m in c.get(path).json()["data"]]
            assert ids == ["meta-llama/Llama-3.1-8B-Instruct", "sql-lora"]
        with server.client() as c:
            assert c.get("/ready").status_code == 200
        with server.client(world.tokens["superadmin"]) as c:
            ready = c.get("/ready")
            assert ready.status_code == 200 and ready.json()["status"] == "ready"
            down = {b["name"]: b for b in ready.json()["backends"]}["ollama"]
            assert down["up"] is False and down["error"]
        vllm.answering = False
        server.run_async(server.ctx.registry.refresh())
        with server.client(token) as c:
            r = c.get(path)
            assert r.status_code == 503 and r.json()["error"]["code"] == "backend_unavailable"
            assert c.get(f"{path}/llama3.2:3b").status_code == 503
        with server.client() as c:
            ready = c.get("/ready")
            assert ready.status_code == 503 and ready.json() == {"status": "not_ready"}
    finally:
        ollama.answering = True
        vllm.answering = True
        server.run_async(server.ctx.registry.refresh())
    with server.client(token) as c:
        assert len(c.get(path).json()["data"]) == 5


def test_ready_without_backends(tmp_path) -> None:
    server = EnclaveServer(make_settings(tmp_path)).start()
    try:
        with server.client() as c:
            assert c.get("/ready").json() == {"status": "ready"}
    finally:
        server.stop()


def test_catch_all_hides_internals(tmp_path) -> None:
    from fastapi import APIRouter

    boom = APIRouter()

    @boom.get("/boom")
    async def explode() -> None:
        raise RuntimeError("internal detail /var/lib/secret")

    server = EnclaveServer(make_settings(tmp_path), extra_routers=[boom]).start()
    try:
        with server.client() as c:
            r = c.get("/boom")
    finally:
        server.stop()
    assert r.status_code == 500
    assert r.json() == {"error": {"message": "Internal server error.", "type": "api_error", "param": None,
                                  "code": "internal_error"}}


def test_unauthenticated_bad_body_gets_401_not_400(service) -> None:
    server, world, _, _ = service
    with server.client() as c:
        r = c.post("/admin/domains", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = c.post("/users/me/pats", json={"bogus": 1}, headers=_headers(world, "revoked_a"))
        assert r.status_code == 401
        r = c.post("/users/me/pats", json={"bogus": 1}, headers=_headers(world, "member_a"))
        assert r.status_code == 403                    # authenticated, lacks `manage`: the scope check comes first
        r = c.post("/users/me/pats", json={"name": "x", "bogus": 1}, headers=_headers(world, "admin_a"))
        assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_field"


def test_endless_header_section_is_cut_off(service) -> None:
    """A client that never finishes its headers is answered 431 and disconnected after the byte cap."""
    server, _, _, _ = service
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    tls = server.client_ssl().wrap_socket(raw, server_hostname="127.0.0.1")
    try:
        tls.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\nx-flood: ")
        received = b""
        try:
            for _ in range(200):                            # up to 3.2 MB, far past the cap
                tls.sendall(b"a" * 16384)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError, OSError):
            pass
        try:
            while chunk := tls.recv(65536):
                received += chunk
        except (ConnectionResetError, ssl.SSLError, OSError):
            pass
    finally:
        tls.close()
    assert received.startswith(b"HTTP/1.1 431"), received[:80]
    assert b'"code": "headers_too_large"' in received


def test_docs_load_from_the_service_only(service) -> None:
    """/docs and /redoc reference no external host (no CDN, no fonts, no online validator); every asset they
    name is served by the enclave itself."""
    import re

    server, _, _, _ = service
    with server.client() as c:
        for page, kinds in (("/docs", {"css", "js", "png"}), ("/redoc", {"js", "png"})):
            html = c.get(page)
            assert html.status_code == 200 and "text/html" in html.headers["content-type"]
            assert not re.search(r"https?:|//[a-z0-9]", html.text.replace("window.location.origin", "")), page
            assets = re.findall(r'(?:src|href)="([^"]+)"', html.text)
            assert {a.rsplit(".", 1)[-1] for a in assets} == kinds, assets
            for asset in assets:
                assert asset.startswith("/docs/static/"), asset
                r = c.get(asset)
                assert r.status_code == 200 and len(r.content) > 1000, asset
        assert '"validatorUrl": null' in c.get("/docs").text
        assert "fonts.googleapis" not in c.get("/redoc").text
