"""Limits and budgets on the inference routes over real HTTPS: each kind refuses at exactly its point with
OpenAI's status, code, type and headers; windows reset (on the service's clock, never a sleep); concurrency
comes back on every ending; a budget lets the request in flight finish; openai-python retries a rate limit but
not a spent budget; the x-ratelimit-* headers are on every inference answer."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import openai
import pytest

from tests.enclave.inference_support import Service, sample, sse_json, start_service
from tests.enclave.limits_support import (CHAT, RATE_HEADERS, Tenant, error_of, fake_clock, infer, new_key,
                                          new_member, new_tenant, put_limits)
from tests.fakes.ollama import FakeOllama
from tests.fakes.vllm import BASE_MODEL, FakeVllm

VLLM = BASE_MODEL
OLLAMA = "llama3.2:3b"
DURATION = re.compile(r"^(\d+ms|\d+s|\d+m\d+s|\d+h\d+m\d+s)$")


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with FakeVllm() as vllm, FakeOllama() as ollama:
        with start_service(tmp_path_factory.mktemp("limits-http"), [
            ({"name": "vllm", "kind": "vllm"}, vllm), ({"name": "ollama", "kind": "ollama"}, ollama),
        ], quotas={"sync_seconds": 0.2}) as service:
            yield service


@pytest.fixture(autouse=True)
def _fresh_fakes(svc: Service) -> None:
    svc.reset_fakes()


def wait_for(condition: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"not within {within} s: {what}"
        time.sleep(0.01)


def pat_limits(svc: Service, t: Tenant, **values: object) -> None:
    r = put_limits(svc, f"/admin/pats/{t.pat_id}/limits", **values)
    assert r.status_code == 200, r.text


def backend_calls(svc: Service, name: str = "vllm") -> int:
    return len([r for r in svc.fakes[name].requests if r.method == "POST"])


def tokens_of_one_request(svc: Service, t: Tenant) -> int:
    r = infer(svc, t, model=VLLM)
    assert r.status_code == 200
    return r.json()["usage"]["total_tokens"]


def in_flight(svc: Service, t: Tenant) -> int:
    c = svc.server.ctx.quotas.counters.counters.get((f"pat:{t.pat_id}", "concurrent", 0))
    return c.in_flight if c is not None else 0


# ---- each kind at exactly its point --------------------------------------------------------------------
def test_rpm_refuses_the_request_after_the_limit_and_the_next_minute_admits_again(svc: Service) -> None:
    t = new_tenant(svc)
    pat_limits(svc, t, rpm=3)
    before = backend_calls(svc)
    answers = [infer(svc, t, model=VLLM) for _ in range(3)]
    assert [r.status_code for r in answers] == [200, 200, 200]
    assert [r.headers["x-ratelimit-remaining-requests"] for r in answers] == ["2", "1", "0"]
    assert all(r.headers["x-ratelimit-limit-requests"] == "3" for r in answers)
    assert all(DURATION.match(r.headers["x-ratelimit-reset-requests"]) for r in answers)
    refused = infer(svc, t, model=VLLM)
    assert refused.status_code == 429
    assert error_of(refused)["code"] == "rate_limit_exceeded" and error_of(refused)["type"] == "requests"
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert "x-should-retry" not in refused.headers        # a rate limit is worth retrying
    assert backend_calls(svc) - before == 3                # refused before the backend
    assert sample(svc.metrics_text(), "cube_quota_refusals_total", kind="rpm", level="pat") >= 1
    fake_clock(svc).advance(seconds=60)
    assert infer(svc, t, model=VLLM).status_code == 200


def test_tpm_refuses_once_the_minute_s_tokens_are_spent(svc: Service) -> None:
    t = new_tenant(svc)
    per_request = tokens_of_one_request(svc, t)            # before any limit: not counted
    pat_limits(svc, t, tpm=2 * per_request)
    first, second = infer(svc, t, model=VLLM), infer(svc, t, model=VLLM)
    assert first.status_code == second.status_code == 200
    assert first.headers["x-ratelimit-limit-tokens"] == str(2 * per_request)
    assert first.headers["x-ratelimit-remaining-tokens"] == str(2 * per_request)   # counted when it ends
    assert second.headers["x-ratelimit-remaining-tokens"] == str(per_request)
    refused = infer(svc, t, model=VLLM)
    assert refused.status_code == 429
    assert error_of(refused) | {"message": ""} == {"message": "", "type": "tokens", "param": None,
                                                    "code": "rate_limit_exceeded"}
    assert refused.headers["x-ratelimit-remaining-tokens"] == "0"
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    fake_clock(svc).advance(seconds=60)
    assert infer(svc, t, model=VLLM).status_code == 200


def test_day_budget_lets_the_requests_in_flight_finish_then_refuses_without_retry(svc: Service) -> None:
    t = new_tenant(svc)
    pat_limits(svc, t, tokens_per_day=1)
    fake = svc.fakes["vllm"]
    fake.event_interval = 0.05
    bodies: list[str] = []

    def stream() -> None:
        r = infer(svc, t, model=VLLM, stream=True)
        assert r.status_code == 200
        bodies.append(r.text)

    threads = [threading.Thread(target=stream) for _ in range(2)]
    for th in threads:
        th.start()
    wait_for(lambda: fake.in_flight == 2, 5, "both streams admitted within the budget")
    for th in threads:
        th.join()
    assert len(bodies) == 2 and all(sse_json(b)[1] for b in bodies)    # both finished, [DONE] included
    refused = infer(svc, t, model=VLLM)
    assert refused.status_code == 429
    assert error_of(refused)["code"] == "insufficient_quota" and error_of(refused)["type"] == "insufficient_quota"
    assert refused.headers["x-should-retry"] == "false" and "retry-after" not in refused.headers
    fake_clock(svc).advance(days=1)
    assert infer(svc, t, model=VLLM).status_code == 200


def test_month_budget_exact_point(svc: Service) -> None:
    t = new_tenant(svc)
    per_request = tokens_of_one_request(svc, t)
    pat_limits(svc, t, tokens_per_month=3 * per_request)
    assert [infer(svc, t, model=VLLM).status_code for _ in range(4)] == [200, 200, 200, 429]
    # (the month's reset is in test_limits_units: a month on this module's clock would expire its keys)


def test_concurrency_refuses_beyond_the_limit_and_comes_back_on_every_ending(svc: Service) -> None:
    t = new_tenant(svc)
    pat_limits(svc, t, concurrent=1)
    fake = svc.fakes["vllm"]
    quotas = svc.server.ctx.quotas

    def refused_while_one_runs() -> None:
        r = infer(svc, t, model=VLLM)
        assert r.status_code == 429 and error_of(r)["code"] == "rate_limit_exceeded"
        assert error_of(r)["type"] == "requests" and r.headers["retry-after"] == "1"

    # the client leaves mid-stream
    fake.stall_after = 1
    with httpx.Client(base_url=svc.server.url, verify=svc.server.client_ssl(), timeout=30,
                      headers={"Authorization": f"Bearer {t.token}"}) as c:
        body = {"model": VLLM, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        with c.stream("POST", f"/proxy/{t.domain_id}/v1/{CHAT}", json=body) as r:
            lines = r.iter_lines()      # kept: a dropped iterator closes the stream
            assert next(lines).startswith("data: ")
            assert in_flight(svc, t) == 1
            refused_while_one_runs()
    wait_for(lambda: in_flight(svc, t) == 0, 5, "the slot came back after the client left mid-stream")
    # the client leaves before the backend answers (not streamed)
    fake.stall_after, fake.delay = None, 3600
    with pytest.raises(httpx.ReadTimeout):
        with httpx.Client(base_url=svc.server.url, verify=svc.server.client_ssl(), timeout=0.5,
                          headers={"Authorization": f"Bearer {t.token}"}) as c:
            infer(svc, t, model=VLLM, client=c)
    wait_for(lambda: in_flight(svc, t) == 0, 5, "the slot came back after the client left a whole body")
    # the backend fails mid-stream
    fake.delay, fake.fail_after = 0.0, 2
    r = infer(svc, t, model=VLLM, stream=True)
    assert r.status_code == 200 and "backend_error" in r.text
    assert in_flight(svc, t) == 0
    # the backend refuses
    fake.fail_after, fake.upstream_status = None, (500, "boom")
    r = infer(svc, t, model=VLLM)
    assert r.status_code >= 500 and in_flight(svc, t) == 0
    # the backend cannot be reached
    fake.upstream_status = None
    fake.answering = False
    try:
        r = infer(svc, t, model=VLLM)
        assert r.status_code >= 500 and in_flight(svc, t) == 0
    finally:
        fake.answering = True
    # an unexpected exception on the way to the backend
    gateway = svc.server.ctx.gateway
    original = gateway.openai

    async def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug")

    gateway.openai = broken
    try:
        r = infer(svc, t, model=VLLM)
        assert r.status_code == 500 and in_flight(svc, t) == 0
    finally:
        gateway.openai = original
    # completion, streamed and not
    assert infer(svc, t, model=VLLM, stream=True).status_code == 200 and in_flight(svc, t) == 0
    assert infer(svc, t, model=VLLM).status_code == 200 and in_flight(svc, t) == 0
    assert quotas.open_tickets == 0


# ---- subjects ----------------------------------------------------------------------------------------
def test_the_user_and_the_domain_bind_every_key_and_the_tightest_subject_refuses(svc: Service) -> None:
    t = new_tenant(svc)
    second_pat, second_token = new_key(svc, t.domain_id, t.user_id)
    assert put_limits(svc, f"/domains/{t.domain_id}/members/{t.user_id}/limits", rpm=2).status_code == 200
    assert infer(svc, t, model=VLLM).status_code == 200
    assert infer(svc, t, model=VLLM, token=second_token).status_code == 200
    refused = infer(svc, t, model=VLLM)
    assert refused.status_code == 429 and "your user in this domain" in error_of(refused)["message"]

    other_user = new_member(svc, t.domain_id)
    _, other_token = new_key(svc, t.domain_id, other_user)
    assert put_limits(svc, f"/admin/domains/{t.domain_id}/limits", rpm=3).status_code == 200
    # counted from when the domain has a limit: the other user's 2, then t's own key is still refused by its user
    assert [infer(svc, t, model=VLLM, token=other_token).status_code for _ in range(2)] == [200, 200]
    assert infer(svc, t, model=VLLM).status_code == 429
    assert put_limits(svc, f"/domains/{t.domain_id}/members/{t.user_id}/limits").status_code == 200   # defaults
    assert infer(svc, t, model=VLLM, token=second_token).status_code == 200     # the domain's 3rd this minute
    refused = infer(svc, t, model=VLLM, token=other_token)
    assert refused.status_code == 429 and "this domain" in error_of(refused)["message"]
    assert refused.headers["x-ratelimit-limit-requests"] == "3"


def test_auth_and_access_failures_never_look_like_limits(svc: Service) -> None:
    t = new_tenant(svc)
    assert put_limits(svc, f"/admin/domains/{t.domain_id}/limits", rpm=0, tokens_per_day=0).status_code == 200
    assert infer(svc, t, model=VLLM, token="cube_pat_" + "x" * 40).status_code == 401
    outsider = svc.world.tokens["member_b"]
    assert infer(svc, t, model=VLLM, token=outsider).status_code == 403
    assert infer(svc, t, model="no-such-model").status_code == 404
    r = infer(svc, t, model=VLLM)
    assert r.status_code == 429 and error_of(r)["code"] == "insufficient_quota"   # budgets are looked at first


# ---- openai-python -------------------------------------------------------------------------------------
def test_openai_python_retries_a_rate_limit_but_not_a_spent_budget(svc: Service) -> None:
    t = new_tenant(svc)
    sent: list[str] = []

    def client() -> openai.OpenAI:
        http = httpx.Client(verify=svc.server.client_ssl(),
                            event_hooks={"request": [lambda r: sent.append(r.url.path)]})
        return openai.OpenAI(base_url=f"{svc.server.url}/proxy/{t.domain_id}/v1", api_key=t.token, max_retries=2,
                             http_client=http)

    pat_limits(svc, t, tokens_per_day=0)
    before = backend_calls(svc)
    with pytest.raises(openai.RateLimitError) as refused:
        client().chat.completions.create(model=VLLM, messages=[{"role": "user", "content": "hi"}])
    assert refused.value.code == "insufficient_quota"
    assert len(sent) == 1 and backend_calls(svc) == before        # asked once, never retried

    sent.clear()
    pat_limits(svc, t, concurrent=0)                               # Retry-After: 1
    with pytest.raises(openai.RateLimitError) as limited:
        client().chat.completions.create(model=VLLM, messages=[{"role": "user", "content": "hi"}])
    assert limited.value.code == "rate_limit_exceeded"
    assert len(sent) == 3                                           # the first try and two retries


# ---- headers -------------------------------------------------------------------------------------------
def test_rate_limit_headers_on_every_inference_answer(svc: Service) -> None:
    t = new_tenant(svc)
    pat_limits(svc, t, rpm=1000, tpm=10_000_000)
    answers = {
        "chat": infer(svc, t, model=VLLM), "chat streamed": infer(svc, t, model=VLLM, stream=True),
        "completions": infer(svc, t, "completions", model=VLLM),
        "completions streamed": infer(svc, t, "completions", model=VLLM, stream=True),
        "embeddings": infer(svc, t, "embeddings", model=VLLM),
        "ollama chat": infer(svc, t, "api/chat", model=OLLAMA, stream=False),
        "ollama chat streamed": infer(svc, t, "api/chat", model=OLLAMA, stream=True),
        "ollama generate streamed": infer(svc, t, "api/generate", model=OLLAMA, stream=True),
        "ollama embed": infer(svc, t, "api/embed", model=OLLAMA),
        "openai route on ollama": infer(svc, t, model=OLLAMA, stream=True),
    }
    svc.fakes["vllm"].upstream_status = (500, "boom")
    answers["backend error"] = infer(svc, t, model=VLLM)
    for what, r in answers.items():
        assert r.status_code == (200 if what != "backend error" else r.status_code), (what, r.text)
        missing = [h for h in RATE_HEADERS if h not in r.headers]
        assert not missing, (what, missing)
        assert r.headers["x-ratelimit-limit-requests"] == "1000" and r.headers["x-ratelimit-limit-tokens"] == "10000000"
    assert answers["backend error"].status_code >= 500
    remaining = [int(r.headers["x-ratelimit-remaining-requests"]) for r in answers.values()]
    assert remaining == list(range(999, 999 - len(answers), -1))

    svc.fakes["vllm"].upstream_status = None
    unlimited = new_tenant(svc)
    r = infer(svc, unlimited, model=VLLM)
    assert r.status_code == 200 and not [h for h in RATE_HEADERS if h in r.headers]


def test_ollama_routes_refuse_in_ollama_s_shape(svc: Service) -> None:
    t = new_tenant(svc)
    pat_limits(svc, t, rpm=1)
    assert infer(svc, t, "api/chat", model=OLLAMA).status_code == 200
    refused = infer(svc, t, "api/chat", model=OLLAMA)
    assert refused.status_code == 429
    assert list(refused.json()) == ["error"] and "Rate limit reached" in refused.json()["error"]
    assert refused.headers["x-ratelimit-remaining-requests"] == "0" and int(refused.headers["retry-after"]) >= 1
    pat_limits(svc, t, tokens_per_day=0)
    spent = infer(svc, t, "api/generate", model=OLLAMA)
    assert spent.status_code == 429 and spent.headers["x-should-retry"] == "false" and "error" in spent.json()


def test_platform_defaults_from_the_settings_bind_every_key(tmp_path) -> None:
    with FakeVllm() as vllm:
        with start_service(tmp_path, [({"name": "vllm", "kind": "vllm"}, vllm)],
                           quotas={"defaults": {"pat": {"rpm": 2}, "domain": {"concurrent": 50}}}) as svc:
            t = new_tenant(svc)
            assert [infer(svc, t, model=VLLM).status_code for _ in range(3)] == [200, 200, 429]
            pat_limits(svc, t, rpm="unlimited")           # a key's own row lifts the default
            assert infer(svc, t, model=VLLM).status_code == 200
            with svc.server.client(t.token) as c:
                mine = c.get("/users/me/limits").json()
            assert [entry["domain_id"] for entry in mine] == [t.domain_id]     # a bound key: its own domain
            levels = {s["subject"]["level"]: s for s in mine[0]["subjects"]}
            assert levels["pat"]["effective"]["rpm"] is None and levels["pat"]["own"]["rpm"] == "unlimited"
            assert levels["domain"]["effective"]["concurrent"] == 50
            assert levels["domain"]["usage"]["concurrent"]["used"] == 0
