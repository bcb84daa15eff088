"""Every route of the app against an explicit expectation for every role x key binding x scope set (item 4).

The routes come from the app itself, so a route added later without an entry in ``ROUTES`` fails
``test_every_route_has_an_expectation``. A request counts as refused when it gets 401 or 403, or 404
``pat_not_found`` on key-by-id routes (unknown and not-yours look alike there); anything else under 500 is
"let through" (a 404 for a missing target or a 409 is a decision made *after* authorization).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta

import pytest
from fastapi.routing import iter_route_contexts

from enclave.store import Store
from enclave.tokens import generate_token, token_hash

from tests.enclave.conftest import PAT_KEY, ROW_KEY, SERVER_SECRET, EnclaveServer, FakeClock, make_settings

ROLES = ("superadmin", "admin", "member", "nonmember")     # admin / member: of domain A
BINDINGS = (None, "A", "B")
SCOPE_SETS = {"all": ("models:read", "models:infer", "manage"), "use": ("models:read", "models:infer"),
              "manage": ("manage",)}


@dataclass(frozen=True)
class Who:
    role: str | None            # None: no key at all
    bound: str | None = None
    scopes: str = "all"

    @property
    def label(self) -> str:
        return "anonymous" if self.role is None else f"{self.role}/bound={self.bound}/{self.scopes}"

    @property
    def manage(self) -> bool:
        return self.role is not None and "manage" in SCOPE_SETS[self.scopes]

    @property
    def read(self) -> bool:
        return self.role is not None and "models:read" in SCOPE_SETS[self.scopes]


Rule = Callable[[Who], bool]


def public(w: Who) -> bool:
    return True


def any_key(w: Who) -> bool:
    return w.role is not None


def platform(w: Who) -> bool:
    """Superadmin, unbound key, manage (a domain-bound key never has platform powers)."""
    return w.role == "superadmin" and w.bound is None and w.manage


def in_domain_a(w: Who) -> bool:
    return w.role in ("superadmin", "admin", "member") and w.bound in (None, "A")


def models_of_a(w: Who) -> bool:
    return in_domain_a(w) and w.read


def infer_in_a(w: Who) -> bool:
    """Inference needs ``models:infer`` (the "all" and "use" scope sets hold it, "manage" does not)."""
    return in_domain_a(w) and w.role is not None and "models:infer" in SCOPE_SETS[w.scopes]


def admin_of_a(w: Who) -> bool:
    return in_domain_a(w) and w.role in ("superadmin", "admin") and w.manage


def own_keys(w: Who) -> bool:
    return w.manage


def key_bound_to_a(w: Who) -> bool:
    """Another user's key bound to A: an admin of A or an unbound superadmin key."""
    return platform(w) or admin_of_a(w)


def nobody(w: Who) -> bool:
    """Refused to every key (Ollama's model management is never proxied; anonymous callers get the 401)."""
    return False


def ready_summary_or_operator(w: Who) -> bool:
    """/ready: anyone without a key gets the status word; a key asks for the reasons, which only an operator
    (``platform``) may read — any other key is refused rather than silently given less."""
    return w.role is None or platform(w)

# (method, route path) -> (rule, concrete path, JSON body). Targets: domain A, user "target" (a member of A),
# the key "target" owns bound to A, the caller's own spare key; throwaways where a route deletes.
ROUTES: dict[tuple[str, str], tuple[Rule, str, object]] = {
    ("GET", "/openapi.json"): (public, "/openapi.json", None),
    ("GET", "/docs"): (public, "/docs", None),
    ("GET", "/docs/static"): (public, "/docs/static/swagger-ui.css", None),
    ("GET", "/docs/oauth2-redirect"): (public, "/docs/oauth2-redirect", None),
    ("GET", "/redoc"): (public, "/redoc", None),
    ("GET", "/health"): (public, "/health", None),
    ("GET", "/ready"): (ready_summary_or_operator, "/ready", None),
    ("GET", "/metrics"): (platform, "/metrics", None),
    ("GET", "/.well-known/cube-ai/attestation"): (public, "/.well-known/cube-ai/attestation", None),
    ("GET", "/proxy/{domain_id}/v1/models"): (models_of_a, "/proxy/{A}/v1/models", None),
    ("GET", "/proxy/{domain_id}/v1/models/{model:path}"): (models_of_a, "/proxy/{A}/v1/models/no-such:1b", None),
    ("POST", "/proxy/{domain_id}/v1/chat/completions"): (infer_in_a, "/proxy/{A}/v1/chat/completions",
                                                          {"model": "no-such:1b", "messages": []}),
    ("POST", "/proxy/{domain_id}/v1/completions"): (infer_in_a, "/proxy/{A}/v1/completions",
                                                     {"model": "no-such:1b", "prompt": "x"}),
    ("POST", "/proxy/{domain_id}/v1/embeddings"): (infer_in_a, "/proxy/{A}/v1/embeddings",
                                                    {"model": "no-such:1b", "input": "x"}),
    ("POST", "/proxy/{domain_id}/api/chat"): (infer_in_a, "/proxy/{A}/api/chat",
                                               {"model": "no-such:1b", "messages": []}),
    ("POST", "/proxy/{domain_id}/api/generate"): (infer_in_a, "/proxy/{A}/api/generate",
                                                   {"model": "no-such:1b", "prompt": "x"}),
    ("POST", "/proxy/{domain_id}/api/embed"): (infer_in_a, "/proxy/{A}/api/embed",
                                                {"model": "no-such:1b", "input": "x"}),
    ("POST", "/proxy/{domain_id}/api/embeddings"): (infer_in_a, "/proxy/{A}/api/embeddings",
                                                     {"model": "no-such:1b", "prompt": "x"}),
    ("POST", "/proxy/{domain_id}/api/show"): (models_of_a, "/proxy/{A}/api/show", {"model": "no-such:1b"}),
    ("GET", "/proxy/{domain_id}/api/tags"): (models_of_a, "/proxy/{A}/api/tags", None),
    ("GET", "/proxy/{domain_id}/api/ps"): (models_of_a, "/proxy/{A}/api/ps", None),
    ("GET", "/proxy/{domain_id}/api/version"): (models_of_a, "/proxy/{A}/api/version", None),
    # Any key gets the same 404 for a request it did not make (tests/enclave/test_receipts.py: the maker's key).
    ("GET", "/proxy/{domain_id}/v1/receipts/{request_id}"): (any_key, "/proxy/{A}/v1/receipts/%032x" % 7, None),
    **{(method, f"/proxy/{{domain_id}}/api/{action}"): (nobody, f"/proxy/{{A}}/api/{action}", {"model": "x:1b"})
       for action in ("pull", "push", "create", "copy", "delete")
       for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")},
    ("GET", "/admin/backends"): (platform, "/admin/backends", None),
    ("GET", "/admin/audit/export"): (platform, "/admin/audit/export", None),
    ("GET", "/admin/models"): (platform, "/admin/models", None),
    ("POST", "/admin/models"): (platform, "/admin/models", {"backend": "nope", "model": "x:1b"}),
    ("DELETE", "/admin/models/{model:path}"): (platform, "/admin/models/no-such:1b", None),
    ("POST", "/admin/domains"): (platform, "/admin/domains", {"name": "new-{n}"}),
    ("GET", "/admin/domains"): (platform, "/admin/domains", None),
    ("GET", "/admin/domains/{domain_id}"): (platform, "/admin/domains/{A}", None),
    ("PATCH", "/admin/domains/{domain_id}"): (platform, "/admin/domains/{A}", {}),
    ("DELETE", "/admin/domains/{domain_id}"): (platform, "/admin/domains/{C}", None),
    ("POST", "/admin/users"): (platform, "/admin/users", {"name": "new-{n}"}),
    ("GET", "/admin/users"): (platform, "/admin/users", None),
    ("GET", "/admin/users/{user_id}"): (platform, "/admin/users/{target}", None),
    ("PATCH", "/admin/users/{user_id}"): (platform, "/admin/users/{target}", {"superadmin": False}),
    ("DELETE", "/admin/users/{user_id}"): (platform, "/admin/users/{victim}", None),
    ("GET", "/admin/users/{user_id}/pats"): (platform, "/admin/users/{target}/pats", None),
    ("POST", "/admin/users/{user_id}/pats"): (platform, "/admin/users/{target}/pats",
                                              {"name": "k", "scopes": ["manage"]}),
    ("DELETE", "/admin/users/{user_id}/pats/{pat_id}"): (platform, "/admin/users/{target}/pats/{target_key}", None),
    ("GET", "/domains/{domain_id}/members"): (admin_of_a, "/domains/{A}/members", None),
    ("PUT", "/domains/{domain_id}/members/{user_id}"): (admin_of_a, "/domains/{A}/members/{target}",
                                                        {"role": "member"}),
    ("DELETE", "/domains/{domain_id}/members/{user_id}"): (admin_of_a, "/domains/{A}/members/{leaver}", None),
    ("GET", "/domains/{domain_id}/pats"): (admin_of_a, "/domains/{A}/pats", None),
    ("POST", "/domains/{domain_id}/members/{user_id}/pats"): (admin_of_a, "/domains/{A}/members/{target}/pats",
                                                              {"name": "k", "scopes": ["manage"]}),
    ("DELETE", "/domains/{domain_id}/pats/{pat_id}"): (admin_of_a, "/domains/{A}/pats/{target_key}", None),
    ("GET", "/users/me"): (any_key, "/users/me", None),
    ("GET", "/users/me/pats"): (own_keys, "/users/me/pats", None),
    ("POST", "/users/me/pats"): (own_keys, "/users/me/pats", {"name": "k", "scopes": ["manage"]}),
    ("DELETE", "/users/me/pats/{pat_id}"): (own_keys, "/users/me/pats/{spare}", None),
    ("GET", "/pats/{pat_id}"): (key_bound_to_a, "/pats/{target_key}", None),
    ("GET", "/admin/usage"): (platform, "/admin/usage", None),
    ("GET", "/domains/{domain_id}/usage"): (admin_of_a, "/domains/{A}/usage", None),
    ("GET", "/users/me/usage"): (any_key, "/users/me/usage", None),   # a key sees its own requests at least
    ("DELETE", "/pats/{pat_id}"): (key_bound_to_a, "/pats/{target_key}", None),
    # limits and budgets (enclave.api.limits)
    **{(method, "/admin/domains/{domain_id}/limits"): (platform, "/admin/domains/{A}/limits", body)
       for method, body in (("GET", None), ("PUT", {}), ("DELETE", None))},
    **{(method, "/admin/pats/{pat_id}/limits"): (platform, "/admin/pats/{target_key}/limits", body)
       for method, body in (("GET", None), ("PUT", {}), ("DELETE", None))},
    ("GET", "/domains/{domain_id}/limits"): (admin_of_a, "/domains/{A}/limits", None),
    **{(method, "/domains/{domain_id}/members/{user_id}/limits"): (admin_of_a, "/domains/{A}/members/{target}/limits",
                                                                   body)
       for method, body in (("GET", None), ("PUT", {}), ("DELETE", None))},
    **{(method, "/domains/{domain_id}/pats/{pat_id}/limits"): (admin_of_a, "/domains/{A}/pats/{target_key}/limits",
                                                               body)
       for method, body in (("GET", None), ("PUT", {}), ("DELETE", None))},
    ("GET", "/users/me/limits"): (in_domain_a, "/users/me/limits?domain={A}", None),
}


#: Routes whose permitted callers get 503 in this world, which has no backend (decided after authorization).
NEEDS_A_BACKEND = {("GET", "/proxy/{domain_id}/api/version")}


def app_routes(app) -> set[tuple[str, str]]:
    """Every (method, path) the app serves; HEAD counts as its GET."""
    return {(m, r.path) for r in iter_route_contexts(app.routes) for m in (r.methods or {"GET"}) if m != "HEAD"}


def everyone() -> list[Who]:
    keyed = [Who(r, b, s) for r, b, s in itertools.product(ROLES, BINDINGS, SCOPE_SETS)]
    return [Who(None), *keyed]


@dataclass
class MatrixWorld:
    ids: dict[str, str]                      # A, B, C, target, victim, leaver, target_key
    tokens: dict[Who, str]
    spares: dict[Who, str]                   # the caller's own second key, same binding


async def seed(store: Store, now) -> MatrixWorld:
    secret = PAT_KEY
    ids = {name: (await store.create_domain(f"dom-{name.lower()}")).id for name in ("A", "B", "C")}
    users = {"superadmin": await store.create_user("root", is_superadmin=True),
             "admin": await store.create_user("admin"), "member": await store.create_user("member"),
             "nonmember": await store.create_user("outsider")}
    await store.set_membership(ids["A"], users["admin"].id, "admin")
    await store.set_membership(ids["A"], users["member"].id, "member")
    for u in ("admin", "member", "nonmember"):
        await store.set_membership(ids["B"], users[u].id, "member")
    for name in ("target", "victim", "leaver"):
        u = await store.create_user(name)
        ids[name] = u.id
        await store.set_membership(ids["A"], u.id, "member")

    async def key(user_id: str, bound: str | None, scopes) -> tuple[str, str]:
        tok = generate_token()
        pat = await store.create_pat(user_id=user_id, name="k", token_hash=token_hash(secret, tok), last4=tok[-4:],
                                     scopes=scopes, expires_at=now + timedelta(days=30),
                                     domain_id=ids[bound] if bound else None)
        return tok, pat.id

    _, ids["target_key"] = await key(ids["target"], "A", SCOPE_SETS["use"])
    tokens, spares = {}, {}
    for who in everyone()[1:]:
        tokens[who], _ = await key(users[who.role].id, who.bound, SCOPE_SETS[who.scopes])
        _, spares[who] = await key(users[who.role].id, who.bound, SCOPE_SETS[who.scopes])
    return MatrixWorld(ids=ids, tokens=tokens, spares=spares)


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EnclaveServer, MatrixWorld]]:
    settings = make_settings(tmp_path_factory.mktemp("matrix"))
    clock = FakeClock()

    async def run() -> MatrixWorld:
        store = await Store.open(settings.effective_database_url(), row_key=ROW_KEY)
        try:
            return await seed(store, clock())
        finally:
            await store.close()

    world = asyncio.run(run())
    server = EnclaveServer(settings, clock=clock).start()
    try:
        yield server, world
    finally:
        server.stop()


def test_every_route_has_an_expectation(matrix) -> None:
    server, _ = matrix
    served = app_routes(server.app)
    assert served - ROUTES.keys() == set(), "routes without an entry in ROUTES (add one)"
    assert ROUTES.keys() - served == set(), "ROUTES lists routes the app no longer serves"


def _refused(route_path: str, response) -> bool:
    if response.status_code in (401, 403):
        return True
    if response.status_code == 404 and "{pat_id}" in route_path:
        return response.json()["error"]["code"] == "pat_not_found"
    return False


def test_every_route_for_every_role_binding_and_scope(matrix) -> None:
    server, world = matrix
    counter = itertools.count()
    wrong: list[str] = []
    for who in everyone():
        token = world.tokens.get(who)
        with server.client(token) as client:
            for (method, route_path), (rule, template, body) in ROUTES.items():
                n = next(counter)
                path = template.format(n=n, spare=world.spares.get(who, "-"), **world.ids)
                payload = {k: v.format(n=n) if isinstance(v, str) else v for k, v in body.items()} \
                    if isinstance(body, dict) else body
                r = client.request(method, path, json=payload)
                assert r.status_code < 500 or (r.status_code == 503 and (method, route_path) in NEEDS_A_BACKEND), \
                    (who.label, method, path, r.text)
                expected = rule(who)
                if _refused(route_path, r) == expected:
                    wrong.append(f"{who.label} {method} {path}: expected {'allowed' if expected else 'refused'}, "
                                 f"got {r.status_code} {r.text[:120]}")
                if who.role is None and not expected:
                    assert r.status_code == 401, (method, path, r.status_code)
    assert not wrong, "\n".join(wrong)
