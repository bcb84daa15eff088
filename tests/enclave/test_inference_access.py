"""Who may infer where, on every OpenAI inference route: the isolation matrix (roles x key bindings x scopes x
domains), and allowlists deciding the list and inference identically (``id in GET /v1/models`` iff inference
with that id is allowed), by property over random allowlists."""

from __future__ import annotations

import uuid
from fnmatch import fnmatchcase
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from enclave.access import ALL_SCOPES, Principal, may_use_model, model_rule
from enclave.store import Domain, Pat, Store, User
from enclave.tokens import generate_token, token_hash

from tests.enclave.conftest import SERVER_SECRET, World, PAT_KEY
from tests.enclave.inference_support import Service, start_service
from tests.fakes.ollama import FakeOllama
from tests.fakes.vllm import FakeVllm

ROUTES = ("chat/completions", "completions", "embeddings")
MODELS = ("llama3.2:3b", "jdoe/tinyllama:1.1b", "hf.co/bartowski/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M",
          "meta-llama/Llama-3.1-8B-Instruct", "sql-lora")
ALLOWED_MODEL = "llama3.2:3b"    # within allow_a's allowlist and every domain's


def body(route: str, model: str) -> dict[str, Any]:
    return {"model": model, **{"chat/completions": {"messages": [{"role": "user", "content": "hi"}]},
                               "completions": {"prompt": "hi"}, "embeddings": {"input": "hi"}}[route]}


async def _more_keys(store: Store, world: World) -> None:
    """A key of member_a's without models:infer, and a domain C whose allowlist admits only meta-llama/*."""
    now = datetime.now(UTC)

    async def key(label: str, user: str, scopes: tuple[str, ...]) -> None:
        token = generate_token()
        await store.create_pat(user_id=world.users[user], name=label, token_hash=token_hash(PAT_KEY, token),
                               last4=token[-4:], scopes=scopes, expires_at=now + timedelta(days=1))
        world.tokens[label] = token

    await key("readonly_a", "member_a", ("models:read",))
    await key("manageonly_a", "admin_a", ("manage",))
    world.domains["C"] = (await store.create_domain("domain-c", model_allowlist=["meta-llama/*"])).id
    user = await store.create_user("user-member_c")
    world.users["member_c"] = user.id
    await store.set_membership(world.domains["C"], user.id, "member")
    await key("member_c", "member_c", ("models:read", "models:infer"))


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with FakeOllama() as ollama, FakeVllm() as vllm:
        with start_service(tmp_path_factory.mktemp("inference-access"), [
                ({"name": "ollama", "kind": "ollama"}, ollama), ({"name": "vllm", "kind": "vllm"}, vllm)],
                setup=_more_keys) as service:
            yield service


def infer(svc: Service, route: str, domain_id: str, model: str, authorization: str | None) -> httpx.Response:
    headers = {"Authorization": authorization} if authorization else {}
    with httpx.Client(base_url=svc.server.url, verify=svc.server.client_ssl(), timeout=30) as c:
        return c.post(f"/proxy/{domain_id}/v1/{route}", json=body(route, ALLOWED_MODEL if model is None else model),
                      headers=headers)


# label -> expected status in (A, B, an unknown domain), for a model every domain and key allows.
MATRIX: dict[str, tuple[int, int, int]] = {
    "superadmin":   (200, 200, 404),
    "admin_a":      (200, 403, 403),
    "member_a":     (200, 403, 403),
    "noscope_a":    (200, 403, 403),     # models:infer alone is enough to infer
    "readonly_a":   (403, 403, 403),     # models:read without models:infer
    "manageonly_a": (403, 403, 403),
    "nonmember":    (403, 403, 403),
    "member_b":     (403, 200, 403),
    "bound_b":      (403, 200, 403),     # a member of A, but the key is bound to B
    "allow_a":      (200, 403, 403),
    "revoked_a":    (401, 401, 401),
    "expired_a":    (401, 401, 401),
    "unknown":      (401, 401, 401),
    "missing":      (401, 401, 401),
}


def authorization(world: World, label: str) -> str | None:
    if label == "missing":
        return None
    return f"Bearer {generate_token() if label == 'unknown' else world.tokens[label]}"


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("label", sorted(MATRIX))
def test_isolation_matrix(svc: Service, label: str, route: str) -> None:
    world = svc.world
    for domain_id, expected in zip((world.domains["A"], world.domains["B"], str(uuid.uuid4())), MATRIX[label]):
        r = infer(svc, route, domain_id, ALLOWED_MODEL, authorization(world, label))
        where = f"{label} {route} {domain_id}"
        assert r.status_code == expected, f"{where}: {r.status_code} {r.text}"
        if expected != 200:
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}, where
            assert error["code"] == {401: "invalid_api_key", 404: "domain_not_found"}.get(
                expected, error["code"]), where
        if expected == 403:
            assert r.json()["error"]["code"] in {"not_a_member", "insufficient_scope"}, where


def test_refusal_reasons(svc: Service) -> None:
    world = svc.world
    a, b = world.domains["A"], world.domains["B"]
    for label, domain_id, code in (("readonly_a", a, "insufficient_scope"), ("manageonly_a", a, "insufficient_scope"),
                                   ("member_a", b, "not_a_member"), ("bound_b", a, "not_a_member"),
                                   ("nonmember", a, "not_a_member")):
        for route in ROUTES:
            r = infer(svc, route, domain_id, ALLOWED_MODEL, authorization(world, label))
            assert r.json()["error"]["code"] == code, (label, route, r.text)


def _not_found_body(r: httpx.Response, model: str) -> dict[str, Any]:
    assert r.status_code == 404, r.text
    error = r.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"
    return {**error, "message": error["message"].replace(model, "<id>")}


@pytest.mark.parametrize("route", ROUTES)
def test_allowlists_refuse_exactly_what_the_list_hides(svc: Service, route: str) -> None:
    world = svc.world
    for label, domain in (("allow_a", "A"), ("member_c", "C"), ("superadmin", "C")):
        domain_id = world.domains[domain]
        with svc.http(label) as c:
            listed = {m["id"] for m in c.get(f"/proxy/{domain_id}/v1/models").json()["data"]}
        assert listed and listed < set(MODELS), (label, listed)
        unknown = _not_found_body(infer(svc, route, domain_id, "no-such:1b", authorization(world, label)), "no-such:1b")
        for model in MODELS:
            r = infer(svc, route, domain_id, model, authorization(world, label))
            if model in listed:
                assert r.status_code != 404 and r.status_code < 500, (label, model, r.text)
            else:   # forbidden looks exactly like unknown
                assert _not_found_body(r, model) == unknown, (label, model)


# ---- the property: list and inference decide alike ------------------------------------------------------------
PATTERN = st.one_of(st.sampled_from(MODELS), st.sampled_from(("*", "llama3.2:*", "meta-llama/*", "*lora", "hf.co/*",
                                                                "*:1b", "jdoe/*", "nothing-matches", "*/*")))
ALLOWLIST = st.one_of(st.none(), st.lists(PATTERN, max_size=4))


def _principal(pat_allowlist: list[str] | None, *, roles: dict[str, str], superadmin: bool = False) -> Principal:
    now = datetime.now(UTC)
    user = User(id="u1", name="u", is_superadmin=superadmin, created_at=now)
    pat = Pat(id="p1", user_id="u1", domain_id=None, name="k", token_hash="h", last4="abcd", scopes=tuple(ALL_SCOPES),
              model_allowlist=tuple(pat_allowlist) if pat_allowlist is not None else None, created_at=now,
              expires_at=now + timedelta(days=1), revoked_at=None, last_used_at=None)
    return Principal(user=user, pat=pat, roles=roles)


@settings(max_examples=300, deadline=None)
@given(pat_allowlist=ALLOWLIST, domain_allowlist=ALLOWLIST, superadmin=st.booleans())
def test_list_and_inference_decide_alike(pat_allowlist: list[str] | None, domain_allowlist: list[str] | None,
                                         superadmin: bool) -> None:
    domain = Domain(id="d1", name="d", model_allowlist=tuple(domain_allowlist) if domain_allowlist is not None
                    else None, created_at=datetime.now(UTC))
    principal = _principal(pat_allowlist, roles={} if superadmin else {"d1": "member"}, superadmin=superadmin)
    listed = {m for m in MODELS if model_rule(principal, domain)(m)}        # what GET /v1/models keeps
    inferable = {m for m in MODELS if may_use_model(principal, domain.id, domain, m)}
    assert listed == inferable

    def admits(patterns: list[str] | None, model: str) -> bool:
        return patterns is None or any(fnmatchcase(model, p) for p in patterns)
    assert inferable == {m for m in MODELS if admits(pat_allowlist, m) and admits(domain_allowlist, m)}
    for m in set(MODELS) - inferable:
        refusal = may_use_model(principal, domain.id, domain, m)
        assert (refusal.status, refusal.code, refusal.param) == (404, "model_not_found", "model")


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pat_allowlist=st.lists(PATTERN, min_size=1, max_size=3), domain_allowlist=ALLOWLIST)
def test_list_and_inference_decide_alike_end_to_end(svc: Service, pat_allowlist: list[str],
                                                    domain_allowlist: list[str] | None) -> None:
    with svc.http("superadmin") as admin:
        created = admin.post("/admin/domains", json={"name": f"prop-{uuid.uuid4().hex[:10]}",
                                                     "model_allowlist": domain_allowlist})
        assert created.status_code == 201, created.text
        domain_id = created.json()["id"]
        minted = admin.post("/users/me/pats", json={"name": "prop", "model_allowlist": pat_allowlist})
        assert minted.status_code == 201, minted.text
    token = minted.json()["token"]
    with httpx.Client(base_url=svc.server.url, verify=svc.server.client_ssl(), timeout=30,
                      headers={"Authorization": f"Bearer {token}"}) as c:
        listed = {m["id"] for m in c.get(f"/proxy/{domain_id}/v1/models").json()["data"]}
    for model in MODELS:
        r = infer(svc, "chat/completions", domain_id, model, f"Bearer {token}")
        assert (r.status_code == 200) == (model in listed), (model, listed, r.status_code, r.text)
        if model not in listed:
            assert r.json()["error"]["code"] == "model_not_found"
