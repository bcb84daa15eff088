"""What the limits tests share: fresh tenants (domain, member, domain-bound key) made through the admin API,
limit setting, requests and the service's clock."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import httpx

from tests.enclave.inference_support import Service

CHAT = "chat/completions"
RATE_HEADERS = ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests",
                "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens")


@dataclass(frozen=True)
class Tenant:
    domain_id: str
    user_id: str
    pat_id: str
    token: str


def root(svc: Service) -> httpx.Client:
    return svc.server.client(svc.world.tokens["superadmin"])


def new_key(svc: Service, domain_id: str, user_id: str) -> tuple[str, str]:
    """(pat id, token) of a new key of the member, bound to the domain."""
    with root(svc) as c:
        r = c.post(f"/domains/{domain_id}/members/{user_id}/pats",
                   json={"name": "k", "scopes": ["models:read", "models:infer"]})
    assert r.status_code == 201, r.text
    return r.json()["id"], r.json()["token"]


def new_member(svc: Service, domain_id: str, role: str = "member") -> str:
    with root(svc) as c:
        user = c.post("/admin/users", json={"name": f"u-{uuid.uuid4().hex[:10]}"}).json()["id"]
        assert c.put(f"/domains/{domain_id}/members/{user}", json={"role": role}).status_code == 200
    return user


def new_tenant(svc: Service) -> Tenant:
    """A domain of its own with one member and a key: counters no other test shares."""
    with root(svc) as c:
        domain = c.post("/admin/domains", json={"name": f"d-{uuid.uuid4().hex[:10]}"}).json()["id"]
    user = new_member(svc, domain)
    pat_id, token = new_key(svc, domain, user)
    return Tenant(domain, user, pat_id, token)


def put_limits(svc: Service, path: str, token: str | None = None, **values: Any) -> httpx.Response:
    with svc.server.client(token or svc.world.tokens["superadmin"]) as c:
        return c.put(path, json=values)


def infer(svc: Service, t: Tenant, route: str = CHAT, *, stream: bool = False, model: str, token: str | None = None,
          client: httpx.Client | None = None) -> httpx.Response:
    body: dict[str, Any] = {"model": model, "stream": stream}
    if route == CHAT or route == "api/chat":
        body["messages"] = [{"role": "user", "content": "hello there"}]
    elif route == "embeddings" or route == "api/embed":
        body["input"] = "hello there"
    else:
        body["prompt"] = "hello there"
    prefix = "" if route.startswith("api/") else "v1/"
    url = f"/proxy/{t.domain_id}/{prefix}{route}"
    if client is not None:
        return client.post(url, json=body)
    with httpx.Client(base_url=svc.server.url, verify=svc.server.client_ssl(), timeout=30,
                      headers={"Authorization": f"Bearer {token or t.token}"}) as c:
        return c.post(url, json=body)


def fake_clock(svc: Service) -> Any:
    """The settable clock under the service's MonotonicClock (tests advance it across windows)."""
    return svc.server.ctx.clock._clock


def error_of(r: httpx.Response) -> dict[str, Any]:
    return r.json()["error"]
