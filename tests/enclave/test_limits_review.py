"""Adversarial review of enclave.quotas (issue 11): each test is an attack that once succeeded, kept with its fix."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi.routing import iter_route_contexts

from enclave.access import OLLAMA_MANAGEMENT_ROUTES
from enclave.quotas import counters as counters_module
from enclave.store import Store

from tests.enclave.inference_support import Service
from tests.enclave.limits_support import CHAT, Tenant, error_of, infer, new_key, new_member, new_tenant, put_limits
from tests.enclave.test_limits_http import OLLAMA, VLLM, backend_calls, svc, wait_for  # noqa: F401  (svc: both fakes)
from tests.enclave.test_limits_units import day, minute, pg_store, replica  # noqa: F401
from tests.enclave.test_store import store  # noqa: F401  (the store on SQLite and on PostgreSQL)


# ---- a limit lowered while a replica holds a lease taken under the old one ----------------------------------
async def test_a_lowered_limit_binds_at_once_not_when_the_old_lease_runs_out(store: Store) -> None:
    """A replica alone leases all that remains; the lease taken under rpm 100 admitted 100 requests after the
    limit was lowered to 3 (and a month budget lowered from a million to 100 let the whole old lease through)."""
    one = replica(store, "r1")
    await one.heartbeat()
    win = minute()
    rpm = one.counter("pat:x", "rpm", *win, 100)
    assert await one.take(rpm, 1)                       # leases the 99 left
    rpm = one.counter("pat:x", "rpm", *win, 3)          # the administrator lowers it
    assert [await one.take(rpm, 1) for _ in range(3)] == [True, True, False]

    slots = one.counter("pat:x", "concurrent", 0, 0, 5)
    assert await one.take(slots, 1)
    one.give_back(slots, 1)                             # idle, holding 5 slots
    slots = one.counter("pat:x", "concurrent", 0, 0, 1)
    assert [await one.take(slots, 1) for _ in range(2)] == [True, False]

    budget = one.counter("pat:x", "tokens_per_day", *day(), 1_000_000)
    assert await one.take(budget, 0)
    one.consume(budget, 150)
    await asyncio.gather(*one._debts)
    budget = one.counter("pat:x", "tokens_per_day", *day(), 100)
    assert not await one.take(budget, 0)                # 150 of 100 spent
    budget = one.counter("pat:x", "tokens_per_day", *day(), 200)   # raised again: 50 left
    assert await one.take(budget, 0)
    await one.leave()


# ---- replicas whose clocks disagree ------------------------------------------------------------------------
async def test_a_replica_whose_clock_runs_behind_is_not_presumed_dead(pg_store: Store, monkeypatch) -> None:
    """Heartbeats were each replica's wall clock: r1 running 30 s behind looked dead to r2, which gave r1's lease
    back to the shared count while r1 still admitted from it (rpm 4 admitted 6). Now the database's clock."""
    r1, r2 = replica(pg_store, "r1"), replica(pg_store, "r2")
    real = time.time
    monkeypatch.setattr(counters_module.time, "time", lambda: real() - 30)   # r1's clock
    await r1.heartbeat()
    win = minute()
    c1 = r1.counter("pat:skew", "rpm", *win, 4)
    assert [await r1.take(c1, 1) for _ in range(2)] == [True, True]          # alone: leases all 4
    monkeypatch.setattr(counters_module.time, "time", real)                  # r2's clock
    assert await r2.heartbeat() == 2                                         # r1 is live
    c2 = r2.counter("pat:skew", "rpm", *win, 4)
    admitted = [await r1.take(c1, 1) for _ in range(2)] + [await r2.take(c2, 1) for _ in range(2)]
    assert admitted.count(True) == 2                                         # 4 in all, never 6
    await r1.leave()
    await r2.leave()


# ---- over HTTPS ------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _fresh_fakes(svc: Service) -> None:
    svc.reset_fakes()


def call(svc: Service, who: str, method: str, path: str, body: object = None) -> httpx.Response:
    with svc.server.client(svc.world.tokens.get(who, who)) as c:
        return c.request(method, path, json=body)


def test_a_limit_lowered_over_the_api_binds_the_next_request(svc: Service) -> None:
    t = new_tenant(svc)
    assert put_limits(svc, f"/admin/pats/{t.pat_id}/limits", rpm=100).status_code == 200
    assert infer(svc, t, model=VLLM).status_code == 200
    assert put_limits(svc, f"/admin/pats/{t.pat_id}/limits", rpm=2).status_code == 200
    assert [infer(svc, t, model=VLLM).status_code for _ in range(2)] == [200, 429]
    # a ceiling lowered under a member's own, higher limit: the domain's counter binds every member
    assert put_limits(svc, f"/admin/domains/{t.domain_id}/limits", rpm=100).status_code == 200
    assert put_limits(svc, f"/domains/{t.domain_id}/members/{t.user_id}/limits", rpm=50).status_code == 200
    other = new_key(svc, t.domain_id, t.user_id)
    key = Tenant(t.domain_id, t.user_id, *other)
    assert infer(svc, key, model=VLLM).status_code == 200
    assert put_limits(svc, f"/admin/domains/{t.domain_id}/limits", rpm=2).status_code == 200
    refused = [infer(svc, key, model=VLLM) for _ in range(2)]
    assert [r.status_code for r in refused] == [200, 429]
    assert "this domain" in error_of(refused[1])["message"]


def test_a_domain_admin_cannot_lift_its_own_limits(svc: Service) -> None:
    """The platform limited admin_a's membership and its own domain-bound key; admin_a set both back to the
    ceiling (PUT) or to the defaults (DELETE)."""
    a, w = svc.world.domains["A"], svc.world
    admin = w.users["admin_a"]
    own_key = call(svc, "admin_a", "POST", f"/domains/{a}/members/{admin}/pats", {"name": "own"}).json()["id"]
    member_path, key_path = f"/domains/{a}/members/{admin}/limits", f"/domains/{a}/pats/{own_key}/limits"
    for path in (member_path, key_path):
        assert call(svc, "superadmin", "PUT", path, {"rpm": 1}).status_code == 200
        for method, body in (("PUT", {"rpm": 5}), ("PUT", {}), ("DELETE", None)):
            r = call(svc, "admin_a", method, path, body)
            assert r.status_code == 403 and error_of(r)["code"] == "own_limits", (path, method, r.text)
        assert call(svc, "admin_a", "GET", path).json()["own"]["rpm"] == 1          # still the platform's
    other_admin = new_member(svc, a, role="admin")
    with svc.server.client(w.tokens["superadmin"]) as c:
        token = c.post(f"/domains/{a}/members/{other_admin}/pats", json={"name": "m", "scopes": ["manage"]}).json()
    assert call(svc, token["token"], "PUT", member_path, {"rpm": 5}).status_code == 200   # another admin may
    assert call(svc, "admin_a", "PUT", f"/domains/{a}/members/{other_admin}/limits", {"rpm": 5}).status_code == 200
    for path in (member_path, key_path, f"/domains/{a}/members/{other_admin}/limits"):
        assert call(svc, "superadmin", "DELETE", path).status_code == 204
    # found sound: nobody outside the domain's members and keys bound to it can be limited by its admins
    for path in (f"/domains/{a}/members/{w.users['superadmin']}/limits", f"/domains/{a}/members/{w.users['nonmember']}"
                 "/limits", f"/domains/{a}/pats/{w.pat_ids['bound_b']}/limits",
                 f"/domains/{a}/pats/{w.pat_ids['member_a']}/limits"):
        assert call(svc, "admin_a", "PUT", path, {"rpm": 1}).status_code == 404, path


@pytest.mark.parametrize("value", ["5", 5.0, 5.5, -1, -5, 2**62 + 1, "Unlimited", "UNLIMITED", " unlimited", True,
                                   False, "", [], {}, "1e3"])
def test_a_limit_is_a_json_whole_number_or_exactly_unlimited(svc: Service, value: object) -> None:
    """``true`` was stored as the limit 1, ``"5"`` and ``5.0`` as 5: coerced, where a typo should be an error."""
    t = new_tenant(svc)
    r = put_limits(svc, f"/admin/pats/{t.pat_id}/limits", rpm=value)
    assert r.status_code == 400, (value, r.text)
    assert error_of(r)["param"] == "rpm" and error_of(r)["code"] == "invalid_value"


def test_the_accepted_limit_forms(svc: Service) -> None:
    t = new_tenant(svc)
    r = put_limits(svc, f"/admin/pats/{t.pat_id}/limits", rpm=0, tpm=2**62, concurrent="unlimited",
                   tokens_per_day=None)
    assert r.status_code == 200, r.text
    assert r.json()["own"] == {"rpm": 0, "tpm": 2**62, "concurrent": "unlimited", "tokens_per_day": None,
                               "tokens_per_month": None}
    assert infer(svc, t, model=VLLM).status_code == 429        # rpm 0 refuses everything


# ---- a tenant escaping its concurrency or its rate ------------------------------------------------------
def _client(svc: Service, t: Tenant, timeout: float = 30) -> httpx.Client:
    return httpx.Client(base_url=svc.server.url, verify=svc.server.client_ssl(), timeout=timeout,
                        headers={"Authorization": f"Bearer {t.token}"})


def _abort_after_first_line(svc: Service, t: Tenant, path: str, body: dict) -> int:
    with _client(svc, t) as c, c.stream("POST", path, json=body) as r:
        if r.status_code == 200:
            next(r.iter_lines())
        return r.status_code


def _give_up_before_headers(svc: Service, t: Tenant, path: str, body: dict, timeout: float = 0.3) -> str:
    try:
        with _client(svc, t, timeout) as c:
            return str(c.post(path, json=body).status_code)
    except httpx.ReadTimeout:
        return "timeout"


def _slots(svc: Service, t: Tenant) -> tuple[int, int]:
    counters = svc.server.ctx.quotas.counters.counters
    found = [counters.get((key, "concurrent", 0)) for key in (f"pat:{t.pat_id}", f"domain:{t.domain_id}")]
    return tuple(c.in_flight if c is not None else 0 for c in found)   # type: ignore[return-value]


def test_many_aborted_requests_leak_no_slot_and_racing_ones_get_exactly_the_limit(svc: Service) -> None:
    """Streams left after their first event, requests left before the answer's headers (streamed, whole,
    embeddings, Ollama's routes), many at once: every slot comes back, and then exactly the limit runs."""
    t = new_tenant(svc)
    for path in (f"/admin/pats/{t.pat_id}/limits", f"/admin/domains/{t.domain_id}/limits"):
        assert put_limits(svc, path, concurrent=3).status_code == 200
    vllm, ollama = svc.fakes["vllm"], svc.fakes["ollama"]
    chat = {"model": VLLM, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    ochat = {"model": OLLAMA, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    openai_path, ollama_path = f"/proxy/{t.domain_id}/v1/", f"/proxy/{t.domain_id}/api/"
    with ThreadPoolExecutor(12) as pool:
        vllm.stall_after = ollama.stall_after = 1
        seen = list(pool.map(lambda i: _abort_after_first_line(
            svc, t, *((openai_path + CHAT, chat) if i % 2 else (ollama_path + "chat", ochat))), range(24)))
        assert set(seen) <= {200, 429} and 200 in seen
        assert vllm.max_in_flight_seen <= 3 and ollama.max_in_flight_seen <= 3
        vllm.stall_after = ollama.stall_after = None
        vllm.delay = ollama.delay = 3600
        bodies = [(openai_path + CHAT, chat), (openai_path + CHAT, {**chat, "stream": False}),
                  (openai_path + "embeddings", {"model": VLLM, "input": "hi"}),
                  (ollama_path + "embed", {"model": OLLAMA, "input": "hi"}), (ollama_path + "generate",
                                                                              {"model": OLLAMA, "prompt": "hi"})]
        seen = list(pool.map(lambda i: _give_up_before_headers(svc, t, *bodies[i % len(bodies)]), range(25)))
        assert set(seen) <= {"timeout", "429"} and "timeout" in seen
    wait_for(lambda: _slots(svc, t) == (0, 0), 10, "every slot back")
    wait_for(lambda: svc.server.ctx.quotas.open_tickets == 0, 10, "every ticket released")
    with ThreadPoolExecutor(8) as pool:       # the backend never answers: the admitted ones hold their slot
        seen = list(pool.map(lambda _: _give_up_before_headers(svc, t, openai_path + CHAT, chat, 5), range(8)))
    assert sorted(seen) == ["429"] * 5 + ["timeout"] * 3


def test_requests_racing_at_a_rate_limit_get_exactly_the_limit(svc: Service) -> None:
    t = new_tenant(svc)
    assert put_limits(svc, f"/admin/pats/{t.pat_id}/limits", rpm=10).status_code == 200
    with ThreadPoolExecutor(20) as pool:
        seen = list(pool.map(lambda _: infer(svc, t, model=VLLM).status_code, range(40)))
    assert sorted(seen) == [200] * 10 + [429] * 30
    # a client's own request id is never taken: two requests naming the same one are two tickets
    assert put_limits(svc, f"/admin/pats/{t.pat_id}/limits", concurrent=5).status_code == 200
    with _client(svc, t) as c:
        body = {"model": VLLM, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        ids = {c.post(f"/proxy/{t.domain_id}/v1/{CHAT}", json=body, headers={"x-request-id": "same"})
               .headers["x-request-id"] for _ in range(3)}
    assert len(ids) == 3 and "same" not in ids
    wait_for(lambda: _slots(svc, t)[0] == 0, 5, "every slot back")
    for method in ("HEAD", "OPTIONS", "GET", "PUT"):       # other methods: 405, and nothing counted
        with _client(svc, t) as c:
            assert c.request(method, f"/proxy/{t.domain_id}/v1/{CHAT}").status_code == 405


#: POST routes under /proxy/{domain_id}/ that generate nothing, so no limit applies (the metadata of one model;
#: Ollama's model management, refused outright). Any other POST route there must be limited.
UNLIMITED_ROUTES = {"/proxy/{domain_id}/api/show": 200,
                    **{f"/proxy/{{domain_id}}/api/{action}": 403 for action in OLLAMA_MANAGEMENT_ROUTES}}


def test_every_inference_route_of_the_app_is_limited(svc: Service) -> None:
    """The routes are enumerated from the app, so a new one that reaches a backend without the limits (LiteLLM's
    budgets skipped on some routes) fails here."""
    t = new_tenant(svc)
    assert put_limits(svc, f"/admin/pats/{t.pat_id}/limits", rpm=0).status_code == 200
    paths = sorted({route.path for route in iter_route_contexts(svc.server.app.routes)
                    if getattr(route, "path", "").startswith("/proxy/{domain_id}/")
                    and "POST" in (getattr(route, "methods", None) or ())})
    assert len(paths) >= 7
    body = {"messages": [{"role": "user", "content": "hi"}], "prompt": "hi", "input": "hi", "stream": False}
    before = {name: backend_calls(svc, name) for name in ("vllm", "ollama")}
    for path in paths:
        model = OLLAMA if "/api/" in path else VLLM
        with svc.server.client(t.token) as c:
            r = c.post(path.replace("{domain_id}", t.domain_id), json={**body, "model": model})
        assert r.status_code == UNLIMITED_ROUTES.get(path, 429), (path, r.text)
    shown = 1                                                # api/show asks the backend for the model's card
    assert backend_calls(svc, "vllm") == before["vllm"] and backend_calls(svc, "ollama") == before["ollama"] + shown


def test_a_refused_request_counts_for_nothing_in_the_headers(svc: Service) -> None:
    """Found sound: a request refused by one kind gives back what it took of the others (its headers say so)."""
    t = new_tenant(svc)
    assert put_limits(svc, f"/admin/pats/{t.pat_id}/limits", rpm=10, concurrent=1, tpm=10**6).status_code == 200
    svc.fakes["vllm"].delay = 3600
    chat = {"model": VLLM, "messages": [{"role": "user", "content": "hi"}]}
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(_give_up_before_headers, svc, t, f"/proxy/{t.domain_id}/v1/{CHAT}", chat, 5)
        wait_for(lambda: _slots(svc, t)[0] == 1, 5, "the first request in flight")
        refused = infer(svc, t, model=VLLM)
        assert refused.status_code == 429 and error_of(refused)["type"] == "requests"
        assert refused.headers["retry-after"] == "1" and "x-should-retry" not in refused.headers
        assert refused.headers["x-ratelimit-remaining-requests"] == "9"      # only the one in flight
        assert refused.headers["x-ratelimit-remaining-tokens"] == str(10**6)
        assert held.result() == "timeout"
    svc.fakes["vllm"].delay = 0
    wait_for(lambda: _slots(svc, t)[0] == 0, 5, "the slot back")
    assert infer(svc, t, model=VLLM).headers["x-ratelimit-remaining-requests"] == "8"


def test_an_unbound_key_carries_its_limits_into_every_domain(svc: Service) -> None:
    """Found sound: the limits of a key bound to no domain follow it (one counter wherever it is used), a user's
    are per domain, and neither domain's admins can touch the key's."""
    one, two = new_tenant(svc), new_tenant(svc)
    with svc.server.client(svc.world.tokens["superadmin"]) as c:
        assert c.put(f"/domains/{two.domain_id}/members/{one.user_id}", json={"role": "admin"}).status_code == 200
        key = c.post(f"/admin/users/{one.user_id}/pats", json={"name": "both", "scopes": ["models:read",
                                                                                          "models:infer",
                                                                                          "manage"]}).json()
    assert put_limits(svc, f"/admin/pats/{key['id']}/limits", rpm=3).status_code == 200
    in_one, in_two = Tenant(one.domain_id, one.user_id, key["id"], key["token"]), \
        Tenant(two.domain_id, one.user_id, key["id"], key["token"])
    assert [infer(svc, t, model=VLLM).status_code for t in (in_one, in_two, in_one, in_two)] == [200, 200, 200, 429]
    r = call(svc, key["token"], "PUT", f"/domains/{two.domain_id}/pats/{key['id']}/limits", {"rpm": 100})
    assert r.status_code == 404                                 # an admin of `two`: the key is not bound there
    assert put_limits(svc, f"/admin/pats/{key['id']}/limits", rpm=100).status_code == 200
    assert put_limits(svc, f"/domains/{two.domain_id}/members/{one.user_id}/limits", rpm=1).status_code == 200
    assert [infer(svc, t, model=VLLM).status_code for t in (in_two, in_two, in_one)] == [200, 429, 200]
