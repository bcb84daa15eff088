"""Attacks on the inference gateway, each kept as a test: a tenant with a member or admin key of domain A, a
stolen key bound to another domain, a greedy or malicious client, and a misbehaving backend.

The backends are the wire-faithful fakes; a test that needs a backend to misbehave in a way no control covers
sets ``script`` on it: the fake then answers inference with those exact wire chunks (see ``Wire``).
"""

from __future__ import annotations

import gzip
import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from enclave.store import Store
from enclave.tokens import generate_token, token_hash

from tests.enclave.conftest import SERVER_SECRET, World, PAT_KEY
from tests.enclave.inference_support import Service, sse_json, start_service
from tests.fakes.base import FakeBackend
from tests.fakes.ollama import FakeOllama, ollama_model
from tests.fakes.streaming import Reply
from tests.fakes.vllm import FakeVllm, vllm_model

VLLM_ID, SHARED = "org/tiny-vllm", "shared-model"
OLLAMA_IDS = ("llama3.2:latest", "llama3.2:3b", "phi3:latest", "secret:latest")
BACKEND_KEY = "backend-secret-key"
CHAT = "chat/completions"


# ---- a backend that says exactly what a test wants ---------------------------------------------------------
class Wire(Response):
    """An answer of exact wire chunks (``gap`` seconds apart; ``forever`` repeats the last chunk until the
    client leaves); every chunk sent is counted in ``sent`` so a test can see the backend was cut off."""

    def __init__(self, chunks: list[bytes], *, media_type: str, headers: dict[str, str] | None = None,
                 gap: float = 0.0, forever: bool = False) -> None:
        self.chunks, self.gap, self.forever = chunks, gap, forever
        self.status_code, self.background = 200, None
        self.extra = [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
        self.media = media_type
        self.left = threading.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        import asyncio

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            self.left.set()

        watcher = asyncio.create_task(watch())
        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", self.media.encode()), *self.extra]})
            chunks = iter(self.chunks)
            last = b""
            while not self.left.is_set():
                chunk = next(chunks, None)
                if chunk is None:
                    if not self.forever:
                        break
                    chunk = last
                last = chunk
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await asyncio.sleep(self.gap)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watcher.cancel()


class Scripted:
    """Mixin: when ``script`` is set, inference answers come from it instead of the fake's generator."""

    script: Callable[[Reply], Response] | None = None
    last_wire: Wire | None = None

    def reply(self, reply: Reply) -> Response:  # type: ignore[override]
        if self.script is None:
            return super().reply(reply)  # type: ignore[misc]
        answer = self.script(reply)
        if isinstance(answer, Wire):
            self.last_wire = answer
        return answer


class ScriptedVllm(Scripted, FakeVllm):
    pass


class ScriptedOllama(Scripted, FakeOllama):
    pass


async def _more_keys(store: Store, world: World) -> None:
    """A superadmin key bound to A, an admin key of A, and a domain C whose allowlist admits only ``phi3:*``."""
    now = datetime.now(UTC)

    async def key(label: str, user_id: str, *, domain: str | None = None, allow: list[str] | None = None) -> None:
        token = generate_token()
        await store.create_pat(user_id=user_id, name=label, token_hash=token_hash(PAT_KEY, token),
                               last4=token[-4:], scopes=("models:read", "models:infer", "manage"),
                               expires_at=now + timedelta(days=1),
                               domain_id=world.domains[domain] if domain else None, model_allowlist=allow)
        world.tokens[label] = token

    await key("super_bound_a", world.users["superadmin"], domain="A")
    world.domains["C"] = (await store.create_domain("domain-c", model_allowlist=["phi3:*"])).id
    user = await store.create_user("user-member_c")
    world.users["member_c"] = user.id
    await store.set_membership(world.domains["C"], user.id, "member")
    await key("member_c", user.id)


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with ScriptedVllm(served=[vllm_model(VLLM_ID), vllm_model(SHARED)], api_key=BACKEND_KEY) as vllm, \
            ScriptedOllama([ollama_model(name) for name in OLLAMA_IDS]) as ollama, \
            FakeVllm(served=[vllm_model("tight-model")]) as tight:
        timeouts = {"first_byte_timeout": 5.0, "idle_timeout": 5.0}
        with start_service(tmp_path_factory.mktemp("inference-attacks"), [
            ({"name": "vllm", "kind": "vllm", "api_key": BACKEND_KEY, **timeouts}, vllm),
            ({"name": "ollama", "kind": "ollama", **timeouts}, ollama),
            ({"name": "tight", "kind": "vllm", "max_in_flight": 1, "max_queued": 2, "queue_timeout": 20,
              **timeouts}, tight),
        ], setup=_more_keys) as service:
            yield service


@pytest.fixture(autouse=True)
def _fresh(svc: Service) -> Iterator[None]:
    svc.reset_fakes()
    for fake in svc.fakes.values():
        if isinstance(fake, Scripted):
            fake.script, fake.last_wire = None, None
    yield
    for name in svc.fakes:
        wait_for(lambda: _admission(svc, name) == (0, 0), 5, f"backend {name}'s slots all came back")


def _admission(svc: Service, backend: str) -> tuple[int, int]:
    admission = svc.server.ctx.gateway.upstreams.get(backend).admission
    return admission.in_flight, admission.queued


def wait_for(condition: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"not within {within} s: {what}"
        time.sleep(0.01)


def client(svc: Service, who: str = "member_a", **headers: str) -> httpx.Client:
    return httpx.Client(base_url=svc.server.url, verify=svc.server.client_ssl(), timeout=30,
                        headers={"Authorization": f"Bearer {svc.world.tokens[who]}", **headers})


def openai_path(svc: Service, route: str, domain: str = "A") -> str:
    return f"/proxy/{svc.world.domains[domain]}/v1/{route}"


def native_path(svc: Service, route: str, domain: str = "A") -> str:
    return f"/proxy/{svc.world.domains[domain]}/api/{route}"


def chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


def inference_seen(fake: FakeBackend) -> list[Any]:
    return [r for r in fake.requests if r.method == "POST"]


# ---- 1. nothing of the client's reaches a backend ----------------------------------------------------------
CLIENT_HEADERS = {"Cookie": "session=client-cookie", "X-Forwarded-For": "203.0.113.7", "X-Real-IP": "203.0.113.7",
                  "Forwarded": "for=203.0.113.7", "X-Api-Key": "client-api-key", "Proxy-Authorization": "Basic eA==",
                  "X-Custom-Secret": "client-custom", "User-Agent": "client-agent/1.0", "OpenAI-Organization": "org-x"}
OPENAI_CASES = [("vllm", VLLM_ID, route, stream) for route in (CHAT, "completions") for stream in (False, True)] + [
    ("vllm", VLLM_ID, "embeddings", False), ("ollama", "phi3:latest", CHAT, True), ("ollama", "phi3:latest", CHAT, False),
    ("ollama", "phi3:latest", "embeddings", False)]
NATIVE_CASES = [("chat", True), ("chat", False), ("generate", True), ("generate", False), ("embed", False),
                ("embeddings", False), ("show", False)]


def _assert_clean_headers(svc: Service, fake: FakeBackend, backend_key: str | None) -> None:
    seen = fake.requests[-1].headers
    pat = svc.world.tokens["member_a"]
    assert not any(pat in value for value in seen.values()), "the PAT reached the backend"
    assert seen.get("authorization") == (f"Bearer {backend_key}" if backend_key else None)
    for name, value in CLIENT_HEADERS.items():
        assert seen.get(name.lower()) != value, f"client header {name} reached the backend"
        assert not any(value in v for v in seen.values()), f"{name}'s value reached the backend"
    # The gateway relays bytes as they come: it must not ask for a compression it would pass on undecoded.
    assert seen.get("accept-encoding") == "identity"


@pytest.mark.parametrize(("backend", "model", "route", "stream"), OPENAI_CASES)
def test_no_client_header_reaches_the_backend_on_openai_routes(svc: Service, backend: str, model: str, route: str,
                                                               stream: bool) -> None:
    body = {"model": model, **({"input": "hi"} if route == "embeddings" else
                               {"prompt": "hi"} if route == "completions" else {"messages": [{"role": "user",
                                                                                              "content": "hi"}]})}
    if stream:
        body["stream"] = True
    with client(svc, **CLIENT_HEADERS) as c:
        r = c.post(openai_path(svc, route), json=body)
    assert r.status_code == 200, r.text
    _assert_clean_headers(svc, svc.fakes[backend], BACKEND_KEY if backend == "vllm" else None)


@pytest.mark.parametrize(("route", "stream"), NATIVE_CASES)
def test_no_client_header_reaches_the_backend_on_native_routes(svc: Service, route: str, stream: bool) -> None:
    body: dict[str, Any] = {"model": "phi3:latest", "stream": stream}
    body.update({"chat": {"messages": [{"role": "user", "content": "hi"}]}, "generate": {"prompt": "hi"},
                 "embed": {"input": "hi"}, "embeddings": {"prompt": "hi"}, "show": {}}[route])
    with client(svc, **CLIENT_HEADERS) as c:
        r = c.post(native_path(svc, route), json=body)
    assert r.status_code == 200, r.text
    _assert_clean_headers(svc, svc.fakes["ollama"], None)


@pytest.mark.parametrize("route", ["ps", "version"])
def test_no_client_header_reaches_the_backend_on_native_gets(svc: Service, route: str) -> None:
    with client(svc, **CLIENT_HEADERS) as c:
        r = c.get(native_path(svc, route))
    assert r.status_code == 200, r.text
    _assert_clean_headers(svc, svc.fakes["ollama"], None)


# ---- 2. model-name tricks -------------------------------------------------------------------------------------
def _not_found_shape(body: bytes, model: str) -> bytes:
    """The body with the model name (as the JSON encoder wrote it) replaced: what must not differ."""
    for written in (json.dumps(model, ensure_ascii=False)[1:-1].encode(), json.dumps(model)[1:-1].encode()):
        body = body.replace(written, b"<model>")
    return body


LOOKALIKES = ["PHI3:latest", "Phi3:Latest", "phi3:latest ", " phi3:latest", "phi3:latest\n", "phi3:lаtest",  # Cyrillic а
              "ｐhi3:latest", "phi3:latest\u200b", "phi3\u2236latest", "phi3:latest\x00"]


@pytest.mark.parametrize("model", LOOKALIKES)
def test_lookalike_model_names_are_unknown_on_both_route_families(svc: Service, model: str) -> None:
    with client(svc) as c:
        openai = c.post(openai_path(svc, CHAT), json=chat(model))
        unknown = c.post(openai_path(svc, CHAT), json=chat("no-such-model"))
        native = c.post(native_path(svc, "chat"), json=chat(model, stream=False))
        native_unknown = c.post(native_path(svc, "chat"), json=chat("no-such-model", stream=False))
    assert openai.status_code == native.status_code == 404
    assert _not_found_shape(openai.content, model) == _not_found_shape(unknown.content, "no-such-model")
    assert _not_found_shape(native.content, model) == _not_found_shape(native_unknown.content, "no-such-model")
    assert not inference_seen(svc.fakes["ollama"])


@pytest.mark.parametrize("model", [["phi3:latest"], {"id": "phi3:latest"}, 3, True, ""])
@pytest.mark.parametrize("family", ["openai", "native"])
def test_model_of_the_wrong_type_is_a_400(svc: Service, model: Any, family: str) -> None:
    path = openai_path(svc, CHAT) if family == "openai" else native_path(svc, "chat")
    with client(svc) as c:
        r = c.post(path, json=chat("x") | {"model": model})
    assert r.status_code == 400, r.text
    assert ("error" in r.json()) and (family == "native") == isinstance(r.json()["error"], str)
    assert not inference_seen(svc.fakes["ollama"])


def test_duplicate_model_keys_check_what_the_backend_receives(svc: Service) -> None:
    allowed, forbidden = "llama3.2:3b", "phi3:latest"        # allow_a may use llama3.2:* only
    fake = svc.fakes["ollama"]
    for path in (openai_path(svc, CHAT), native_path(svc, "chat")):
        raw = ('{"model": "%s", "messages": [], "stream": false, "model": "%s"}' % (allowed, forbidden)).encode()
        with client(svc, "allow_a", **{"content-type": "application/json"}) as c:
            r = c.post(path, content=raw)
            assert r.status_code == 404, r.text       # json.loads keeps the last key: that is what was checked
            assert not inference_seen(fake)
            raw = ('{"model": "%s", "messages": [], "stream": false, "model": "%s"}' % (forbidden, allowed)).encode()
            r = c.post(path, content=raw)
        assert r.status_code == 200, r.text
        sent = inference_seen(fake)[-1].body
        assert sent.count(b'"model"') == 1 and json.loads(sent)["model"] == allowed
        fake.requests.clear()


def test_legacy_name_beside_model_never_reaches_the_backend(svc: Service) -> None:
    fake = svc.fakes["ollama"]
    with client(svc, "allow_a") as c:
        r = c.post(native_path(svc, "chat"), json=chat("llama3.2:3b", stream=False, name="phi3:latest"))
        assert r.status_code == 200, r.text
        sent = json.loads(inference_seen(fake)[-1].body)
        assert sent["model"] == "llama3.2:3b" and "name" not in sent
        r = c.post(native_path(svc, "chat"), json=chat("phi3:latest", stream=False, name="llama3.2:3b"))
        assert r.status_code == 404, r.text            # `model` wins, as in Ollama
        r = c.post(native_path(svc, "show"), json={"name": "phi3:latest"})
        assert r.status_code == 404, r.text
        r = c.post(native_path(svc, "show"), json={"name": "llama3.2"})
        assert r.status_code == 200, r.text
    assert json.loads(fake.requests[-1].body) == {"model": "llama3.2:latest"}


def test_untagged_names_and_tag_patterns(svc: Service) -> None:
    """``llama3.2:*`` admits ``llama3.2`` on the native routes (it is ``llama3.2:latest``, and the backend is sent
    that); the OpenAI routes take exact ids only, like ``/v1/models``."""
    fake = svc.fakes["ollama"]
    with client(svc, "allow_a") as c:
        r = c.post(native_path(svc, "generate"), json={"model": "llama3.2", "prompt": "p", "stream": False})
        assert r.status_code == 200, r.text
        assert json.loads(inference_seen(fake)[-1].body)["model"] == "llama3.2:latest"
        assert c.post(openai_path(svc, CHAT), json=chat("llama3.2")).status_code == 404
        assert c.post(openai_path(svc, CHAT), json=chat("llama3.2:latest")).status_code == 200
        assert c.post(native_path(svc, "generate"), json={"model": "phi3", "prompt": "p"}).status_code == 404
        listed = {m["id"] for m in c.get(f"/proxy/{svc.world.domains['A']}/v1/models").json()["data"]}
    assert listed == {"llama3.2:latest", "llama3.2:3b"}


def test_a_vllm_model_on_the_native_routes_is_unknown_when_forbidden(svc: Service) -> None:
    with client(svc, "allow_a") as c:
        forbidden = c.post(native_path(svc, "chat"), json=chat(VLLM_ID))
        unknown = c.post(native_path(svc, "chat"), json=chat("org/no-such-model"))
    assert forbidden.status_code == unknown.status_code == 404
    assert _not_found_shape(forbidden.content, VLLM_ID) == _not_found_shape(unknown.content, "org/no-such-model")
    with client(svc) as c:
        allowed = c.post(native_path(svc, "chat"), json=chat(VLLM_ID))
    assert allowed.status_code == 404 and "/v1/chat/completions" in allowed.json()["error"]
    assert not inference_seen(svc.fakes["vllm"])


# ---- 3. domain tricks ------------------------------------------------------------------------------------------
def test_domain_by_name_id_case_and_foreign_ids(svc: Service) -> None:
    a, b = svc.world.domains["A"], svc.world.domains["B"]
    body = chat("phi3:latest")
    with client(svc) as c:
        assert c.post(f"/proxy/domain-a/v1/{CHAT}", json=body).status_code == 200
        assert c.post(f"/proxy/{a.upper()}/v1/{CHAT}", json=body).status_code == 200
        foreign = c.post(f"/proxy/{b}/v1/{CHAT}", json=body)
        unknown = c.post(f"/proxy/00000000-0000-4000-8000-000000000000/v1/{CHAT}", json=body)
        unknown_name = c.post(f"/proxy/domain-zzz/v1/{CHAT}", json=body)
        assert foreign.status_code == unknown.status_code == unknown_name.status_code == 403
        assert foreign.content == unknown.content == unknown_name.content
    for who in ("super_bound_a", "bound_b"):
        other = b if who == "super_bound_a" else a
        with client(svc, who) as c:
            for ref in (other, other.upper(), "domain-b" if who == "super_bound_a" else "domain-a"):
                r = c.post(f"/proxy/{ref}/v1/{CHAT}", json=body)
                assert r.status_code == 403 and r.json()["error"]["code"] == "not_a_member", (who, ref, r.text)
                r = c.post(f"/proxy/{ref}/api/chat", json=body)
                assert r.status_code == 403 and set(r.json()) == {"error"}, (who, ref, r.text)
    with client(svc, "super_bound_a") as c:
        assert c.post(f"/proxy/{a}/v1/{CHAT}", json=body).status_code == 200
    assert len(inference_seen(svc.fakes["ollama"])) == 3


# ---- 4. Ollama native: the tenant's own fields pass, management never does -------------------------------------
def test_generate_fields_of_the_tenant_pass_through(svc: Service) -> None:
    fields = {"raw": True, "template": "{{ .Prompt }}", "system": "be terse", "context": [1, 2, 3],
              "keep_alive": "10m", "options": {"temperature": 0.1, "num_ctx": 2048, "seed": 7}, "format": "json",
              "images": [], "think": False, "suffix": "end"}
    with client(svc) as c:
        r = c.post(native_path(svc, "generate"), json={"model": "phi3:latest", "prompt": "p", "stream": False,
                                                       "priority": 9, **fields})
    assert r.status_code == 200, r.text
    sent = json.loads(inference_seen(svc.fakes["ollama"])[-1].body)
    assert sent == {"model": "phi3:latest", "prompt": "p", "stream": False, **fields}


MANAGEMENT = ("pull", "push", "create", "copy", "delete")


@pytest.mark.parametrize("who", ["superadmin", "super_bound_a", "admin_a", "member_a", "bound_b"])
def test_management_is_refused_to_every_key_and_method(svc: Service, who: str) -> None:
    fake = svc.fakes["ollama"]
    with client(svc, who) as c:
        for action in MANAGEMENT:
            for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"):
                for path in (native_path(svc, action), native_path(svc, action).replace(action, f"%{ord(action[0]):02x}{action[1:]}")):
                    r = c.request(method, path, json={"model": "phi3:latest", "name": "phi3:latest",
                                                      "source": "phi3:latest", "destination": "x"})
                    assert r.status_code == 403, (method, path, r.status_code)
                    if method != "HEAD":
                        assert "admin API" in r.json()["error"], r.text
    assert not [r for r in fake.requests if r.path.startswith(tuple(f"/api/{a}" for a in MANAGEMENT))]
    assert set(fake.model_names) >= set(OLLAMA_IDS)


def test_other_ollama_paths_are_not_proxied(svc: Service) -> None:
    fake = svc.fakes["ollama"]
    with client(svc, "superadmin") as c:
        for method, route in (("POST", "blobs/sha256:" + "0" * 64), ("HEAD", "blobs/sha256:" + "0" * 64),
                              ("GET", "tags/../pull"), ("POST", "chat/../pull"), ("GET", ""), ("POST", "push/x")):
            r = c.request(method, native_path(svc, route))
            assert r.status_code in (403, 404, 405), (method, route, r.status_code)
    assert not [r for r in fake.requests if "blobs" in r.path or "pull" in r.path or "push" in r.path]


def _load_everything(fake: FakeOllama) -> None:
    fake.loaded = set(OLLAMA_IDS)


@pytest.mark.parametrize(("who", "visible"), [("allow_a", {"llama3.2:latest", "llama3.2:3b"}),
                                              ("member_c", {"phi3:latest"}), ("member_a", set(OLLAMA_IDS))])
def test_tags_and_ps_show_only_usable_models(svc: Service, who: str, visible: set[str]) -> None:
    _load_everything(svc.fakes["ollama"])
    domain = "C" if who == "member_c" else "A"
    with client(svc, who) as c:
        tags = c.get(native_path(svc, "tags", domain)).json()
        ps = c.get(native_path(svc, "ps", domain)).json()
        listed = {m["id"] for m in c.get(f"/proxy/{svc.world.domains[domain]}/v1/models").json()["data"]}
        hidden = sorted(set(OLLAMA_IDS) - visible)
        shows = [c.post(native_path(svc, "show", domain), json={"model": m}) for m in hidden]
        unknown = c.post(native_path(svc, "show", domain), json={"model": "no-such:latest"})
    assert {m["name"] for m in tags["models"]} == visible == {m for m in listed if m in OLLAMA_IDS}
    assert {m["name"] for m in ps["models"]} == visible and {m["model"] for m in ps["models"]} == visible
    for model, r in zip(hidden, shows):
        assert r.status_code == 404
        assert _not_found_shape(r.content, model) == _not_found_shape(unknown.content, "no-such:latest")


# ---- 5. streams from a misbehaving backend ---------------------------------------------------------------------
SSE_TYPE = "text/event-stream; charset=utf-8"


def _sse_chunk(text: str) -> bytes:
    doc = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": VLLM_ID,
           "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
    return b"data: " + json.dumps(doc, ensure_ascii=False).encode() + b"\n\n"


def _stream(svc: Service, body: dict[str, Any], path: str | None = None) -> httpx.Response:
    with client(svc) as c:
        return c.post(path or openai_path(svc, CHAT), json=body)


def test_a_huge_event_without_terminator_is_cut_at_the_event_limit(svc: Service) -> None:
    fake = svc.fakes["vllm"]
    block = b"x" * (1 << 20)
    fake.script = lambda reply: Wire([_sse_chunk("ok"), b'data: {"choices":[{"delta":{"content":"', block],
                                     media_type=SSE_TYPE, forever=True)   # 1 MiB blocks until cut off
    r = _stream(svc, chat(VLLM_ID, stream=True))
    assert r.status_code == 200
    events, done = sse_json(r.text)
    assert not done and events[0]["choices"][0]["delta"]["content"] == "ok"
    assert events[-1]["error"]["code"] == "backend_error" and "larger than" in events[-1]["error"]["message"]
    assert len(r.content) < 64 * 1024
    wait_for(lambda: fake.last_wire is not None and fake.last_wire.left.is_set(), 5, "the backend was cut off")


def test_ndjson_line_without_end_is_cut_at_the_event_limit(svc: Service) -> None:
    fake = svc.fakes["ollama"]
    fake.script = lambda reply: Wire([b'{"model":"phi3:latest","response":"', b"y" * (1 << 20)], media_type="application/x-ndjson",
                                     forever=True)
    r = _stream(svc, {"model": "phi3:latest", "prompt": "p"}, native_path(svc, "generate"))
    assert r.status_code == 200
    lines = r.content.split(b"\n")
    assert lines[-1] == b"" and len(lines) == 2 and "larger than" in json.loads(lines[0])["error"]


def test_nothing_is_relayed_after_done(svc: Service) -> None:
    fake = svc.fakes["vllm"]
    fake.script = lambda reply: Wire([_sse_chunk("a"), b"data: [DONE]\n\n", _sse_chunk("injected"),
                                      b"data: [DONE]\n\n"], media_type=SSE_TYPE)
    r = _stream(svc, chat(VLLM_ID, stream=True))
    events, done = sse_json(r.text)
    assert done and [e["choices"][0]["delta"]["content"] for e in events] == ["a"]
    assert "injected" not in r.text


def test_nothing_is_relayed_after_ollama_done(svc: Service) -> None:
    fake = svc.fakes["ollama"]
    fake.script = lambda reply: Wire([b'{"response":"a","done":false}\n', b'{"response":"","done":true,"eval_count":1}\n',
                                      b'{"response":"injected","done":false}\n'], media_type="application/x-ndjson")
    r = _stream(svc, {"model": "phi3:latest", "prompt": "p"}, native_path(svc, "generate"))
    assert [json.loads(line)["response"] for line in r.text.splitlines()] == ["a", ""]


def test_endless_tiny_events_end_when_the_client_leaves(svc: Service) -> None:
    fake = svc.fakes["vllm"]
    fake.script = lambda reply: Wire([_sse_chunk("t")], media_type=SSE_TYPE, gap=0.001, forever=True)
    with client(svc) as c:
        with c.stream("POST", openai_path(svc, CHAT), json=chat(VLLM_ID, stream=True)) as r:
            lines = r.iter_lines()
            for _ in range(200):
                assert next(lines) in ("", _sse_chunk("t").decode().strip())
    wait_for(lambda: fake.last_wire.left.is_set(), 2, "the backend saw the client leave")


def test_event_stream_to_a_non_stream_request_is_relayed_as_sent(svc: Service) -> None:
    fake = svc.fakes["vllm"]
    wire = [_sse_chunk("a"), b"data: [DONE]\n\n"]
    fake.script = lambda reply: Wire(wire, media_type=SSE_TYPE)
    r = _stream(svc, chat(VLLM_ID))
    assert r.status_code == 200 and r.content == b"".join(wire)
    assert svc.record(r).usage is not None and svc.record(r).usage.estimated


def test_json_to_a_stream_request_is_relayed_as_json(svc: Service) -> None:
    fake = svc.fakes["vllm"]
    doc = {"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant",
           "content": "whole"}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 3, "completion_tokens": 1,
                                                                     "total_tokens": 4}}
    fake.script = lambda reply: Wire([json.dumps(doc).encode()], media_type="application/json")
    r = _stream(svc, chat(VLLM_ID, stream=True))
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json") and r.json() == doc
    assert svc.record(r).usage.total_tokens == 4


@pytest.mark.parametrize("stream", [True, False])
def test_gzip_from_the_backend_reaches_the_client_decoded(svc: Service, stream: bool) -> None:
    fake = svc.fakes["vllm"]
    plain = _sse_chunk("zipped") + b"data: [DONE]\n\n" if stream else json.dumps(
        {"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": {"content": "zipped"}}]}).encode()
    packed = gzip.compress(plain)
    fake.script = lambda reply: Wire([packed[:10], packed[10:]], media_type=SSE_TYPE if stream else "application/json",
                                     headers={"content-encoding": "gzip"})
    with client(svc) as c:
        r = c.post(openai_path(svc, CHAT), json=chat(VLLM_ID, stream=stream), headers={"accept-encoding": "identity"})
    assert r.status_code == 200
    assert "content-encoding" not in r.headers
    assert r.content == plain


def test_utf8_split_across_reads_arrives_intact(svc: Service) -> None:
    fake = svc.fakes["vllm"]
    event = _sse_chunk("é€😀")
    cut = event.index("😀".encode()) + 2
    fake.script = lambda reply: Wire([event[:cut], event[cut:], b"data: [DONE]\n\n"], media_type=SSE_TYPE, gap=0.05)
    r = _stream(svc, chat(VLLM_ID, stream=True))
    assert r.content == event + b"data: [DONE]\n\n"
    events, done = sse_json(r.text)
    assert done and events[0]["choices"][0]["delta"]["content"] == "é€😀"


# ---- 6. admission slots never leak ------------------------------------------------------------------------------
def test_slot_comes_back_after_a_backend_4xx_and_a_mid_stream_failure(svc: Service) -> None:
    fake = svc.fakes["tight"]
    fake.upstream_status = (400, "bad request")
    with client(svc) as c:
        for stream in (False, True):
            assert c.post(openai_path(svc, CHAT), json=chat("tight-model", stream=stream)).status_code == 400
            assert _admission(svc, "tight") == (0, 0)
        fake.upstream_status, fake.fail_after = None, 2
        r = c.post(openai_path(svc, CHAT), json=chat("tight-model", stream=True))
        assert r.status_code == 200 and '"backend_error"' in r.text
    wait_for(lambda: _admission(svc, "tight") == (0, 0), 2, "the slot came back")


def _leave_after(svc: Service, body: dict[str, Any], seconds: float) -> None:
    with client(svc) as c:
        with pytest.raises(httpx.ReadTimeout):
            c.post(openai_path(svc, CHAT), json=body, timeout=httpx.Timeout(30, read=seconds))


@pytest.mark.parametrize("stream", [True, False])
def test_client_gone_before_the_first_byte_cancels_the_backend(svc: Service, stream: bool) -> None:
    fake = svc.fakes["tight"]
    fake.delay = 3600
    left = time.monotonic()
    _leave_after(svc, chat("tight-model", stream=stream), 0.5)
    wait_for(lambda: fake.requests_cancelled == 1, 3, "the backend saw the client leave")
    assert fake.cancelled_at[-1] - left < 0.5 + 1.0
    wait_for(lambda: _admission(svc, "tight") == (0, 0), 2, "the slot came back")
    assert svc.records[-1].outcome == "cancelled"


def test_client_gone_during_a_non_streamed_answer_cancels_the_backend(svc: Service) -> None:
    fake = svc.fakes["vllm"]
    # Headers at once, then a JSON body that never ends (a non-streamed answer still being produced).
    fake.script = lambda reply: Wire([b'{"id": "x"', b" "], media_type="application/json", gap=0.05, forever=True)
    with client(svc) as c:
        with pytest.raises(httpx.ReadTimeout):
            c.post(openai_path(svc, CHAT), json=chat(VLLM_ID), timeout=httpx.Timeout(30, read=0.5))
    left = time.monotonic()
    wait_for(lambda: fake.last_wire is not None and fake.last_wire.left.is_set(), 1, "the backend saw the client leave")
    wait_for(lambda: _admission(svc, "vllm") == (0, 0), 2, "the slot came back")
    assert svc.records[-1].outcome == "cancelled" and time.monotonic() - left < 1


def test_client_gone_while_queued_frees_the_queue(svc: Service) -> None:
    fake = svc.fakes["tight"]
    fake.stall_after = 1
    with client(svc) as c:
        with c.stream("POST", openai_path(svc, CHAT), json=chat("tight-model", stream=True)) as holder:
            lines = holder.iter_lines()   # kept: a dropped line iterator closes the connection
            next(lines)
            assert _admission(svc, "tight") == (1, 0)
            waiter = threading.Thread(target=_leave_after, args=(svc, chat("tight-model"), 0.5))
            waiter.start()
            wait_for(lambda: _admission(svc, "tight") == (1, 1), 2, "the second request queued")
            waiter.join()
            wait_for(lambda: _admission(svc, "tight") == (1, 0), 2, "the gone waiter left the queue")
    wait_for(lambda: _admission(svc, "tight") == (0, 0), 2, "the slot came back")
    fake.stall_after = None
    with client(svc) as c:
        assert c.post(openai_path(svc, CHAT), json=chat("tight-model")).status_code == 200


# ---- 7. error shapes ----------------------------------------------------------------------------------------------
def test_every_native_error_is_ollama_shaped_and_every_other_an_envelope(svc: Service) -> None:
    a = svc.world.domains["A"]
    big = b'{"model": "phi3:latest", "prompt": "' + b"x" * (svc.server.ctx.settings.limits.max_body_bytes + 10) + b'"}'
    cases = [("POST", "chat", None, b"{", {}), ("POST", "chat", "member_a", b"{", {}),
             ("POST", "chat", "member_a", b"[]", {}), ("GET", "chat", "member_a", b"", {}),
             ("POST", "nothing", "member_a", b"{}", {}), ("POST", "generate", "member_a", big, {}),
             ("POST", "chat", "bound_b", b'{"model":"phi3:latest"}', {}),
             ("POST", "chat", "member_a", b'{"model":"phi3:latest"}', {"Authorization": "Bearer cube_pat_forged"})]
    for method, route, who, content, headers in cases:
        with (client(svc, who) if who else httpx.Client(base_url=svc.server.url, verify=svc.server.client_ssl())) as c:
            native = c.request(method, f"/proxy/{a}/api/{route}", content=content, headers=headers)
            openai = c.request(method, f"/proxy/{a}/v1/{route}", content=content, headers=headers)
        assert native.status_code >= 400 and openai.status_code >= 400, (route, who)
        assert list(native.json()) == ["error"] and isinstance(native.json()["error"], str), native.text
        assert set(openai.json()["error"]) == {"message", "type", "param", "code"}, openai.text


@pytest.mark.parametrize("status", [401, 403])
def test_a_backend_refusing_the_gateways_key_is_a_502_not_the_clients_401(svc: Service, status: int) -> None:
    svc.fakes["vllm"].upstream_status = (status, "invalid api key")
    with client(svc) as c:
        r = c.post(openai_path(svc, CHAT), json=chat(VLLM_ID))
    assert r.status_code == 502 and r.json()["error"]["code"] == "backend_error", r.text
