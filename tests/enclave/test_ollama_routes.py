"""The Ollama-native routes over real HTTPS, driven by the official ``ollama`` client and raw HTTP: inference
relayed line by line, tags/ps/show/version, access decided like /v1/models, management refused, and every error
in Ollama's ``{"error": "..."}`` shape."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import httpx
import ollama
import pytest
from prometheus_client.parser import text_string_to_metric_families

from enclave.inference.record import InferenceRecord
from enclave.inference.usage import Usage

from tests.enclave.conftest import EnclaveServer, FakeClock, World, make_settings
from tests.enclave.test_service import start_service
from tests.fakes.ollama import FakeOllama, ollama_model
from tests.fakes.vllm import FakeVllm

FIRST_BYTE_TIMEOUT = 1.0
OLLAMA_MODELS = {"llama3.2:3b", "jdoe/tinyllama:1.1b", "hf.co/bartowski/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M"}
SECOND_MODELS = {"phi3:latest"}   # the second backend also offers llama3.2:3b, shadowed by the first
VLLM_MODEL = "meta-llama/Llama-3.1-8B-Instruct"


class Service:
    def __init__(self, server: EnclaveServer, world: World, ollama: FakeOllama, second: FakeOllama,
                 vllm: FakeVllm) -> None:
        self.server, self.world, self.ollama, self.second, self.vllm = server, world, ollama, second, vllm
        self.records: list[InferenceRecord] = []
        server.ctx.gateway.recorder.sinks.append(self.records.append)

    def domain(self, label: str = "A") -> str:
        return self.world.domains[label]

    def client(self, who: str = "member_a", domain: str = "A") -> ollama.Client:
        return ollama.Client(host=f"{self.server.url}/proxy/{self.domain(domain)}",
                             headers={"Authorization": f"Bearer {self.world.tokens[who]}"},
                             verify=self.server.client_ssl(), timeout=20)

    def http(self, who: str | None = "member_a") -> httpx.Client:
        return self.server.client(self.world.tokens[who] if who else None)

    def api(self, route: str, domain: str = "A") -> str:
        return f"/proxy/{self.domain(domain)}/api/{route}"


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    second_models = [ollama_model("llama3.2:3b"), ollama_model("phi3")]
    with FakeOllama() as first, FakeOllama(second_models) as second, FakeVllm() as vllm:
        backends = [{"name": "ollama", "kind": "ollama", "base_url": first.base_url,
                     "first_byte_timeout": FIRST_BYTE_TIMEOUT},
                    {"name": "ollama2", "kind": "ollama", "base_url": second.base_url},
                    {"name": "vllm", "kind": "vllm", "base_url": vllm.base_url}]
        server, world = start_service(make_settings(tmp_path_factory.mktemp("ollama"), backends=backends),
                                      FakeClock())
        try:
            yield Service(server, world, first, second, vllm)
        finally:
            server.stop()


@pytest.fixture
def svc(service: Service) -> Iterator[Service]:
    """The module's service with the fakes' controls back to normal after each test."""
    yield service
    for fake in (service.ollama, service.second):
        fake.answering = True
        fake.event_interval, fake.fail_after, fake.error_line_after = 0.0, None, None
        fake.upstream_status, fake.delay, fake.tokens = None, 0.0, None


def _last_record(svc: Service, route: str) -> InferenceRecord:
    """The record of the latest finished request on ``route`` (a stream's is written when it ends)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        found = [r for r in svc.records if r.route == route]
        if found:
            return found[-1]
        time.sleep(0.02)
    raise AssertionError(f"no inference record for {route}")


def _tokens_metric(svc: Service, model: str, kind: str) -> float:
    with svc.http("superadmin") as c:
        text = c.get("/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "cube_tokens_total" and sample.labels == {
                    "domain": svc.domain(), "model": model, "kind": kind}:
                return sample.value
    return 0.0


def _ollama_error(response: httpx.Response, status: int) -> str:
    """The message of an Ollama-shaped error answer with this status (and nothing else in the body)."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert list(body) == ["error"] and isinstance(body["error"], str) and body["error"], body
    return body["error"]


# ---- the official client ----------------------------------------------------------------------------------
def test_chat_streamed_with_the_ollama_client(svc: Service) -> None:
    svc.records.clear()
    before = _tokens_metric(svc, "llama3.2:3b", "completion")
    parts = list(svc.client().chat(model="llama3.2:3b", messages=[{"role": "user", "content": "hi there"}],
                                   stream=True))
    assert all(not p.done for p in parts[:-1]) and parts[-1].done and parts[-1].done_reason == "stop"
    text = "".join(p.message.content for p in parts)
    assert text and len(parts) == 9   # 8 tokens, then the final line
    final = parts[-1]
    record = _last_record(svc, "api/chat")
    assert record.stream and record.outcome == "completed" and record.model == "llama3.2:3b"
    assert record.usage == Usage(final.prompt_eval_count, final.eval_count, final.prompt_eval_count + final.eval_count)
    assert _tokens_metric(svc, "llama3.2:3b", "completion") == before + final.eval_count


def test_chat_not_streamed_and_stream_is_the_default(svc: Service) -> None:
    reply = svc.client().chat(model="llama3.2:3b", messages=[{"role": "user", "content": "hello"}], stream=False)
    assert reply.done and reply.message.role == "assistant" and reply.message.content
    with svc.http() as c:
        r = c.post(svc.api("chat"), json={"model": "llama3.2:3b", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    lines = r.content.split(b"\n")
    assert lines[-1] == b"" and all(json.loads(line) for line in lines[:-1])
    assert json.loads(lines[-2])["done"] is True
    assert "stream" not in svc.ollama.json_bodies("/api/chat")[-1]   # Ollama's own default applies


def test_generate_with_suffix_and_gateway_owned_fields(svc: Service) -> None:
    svc.records.clear()
    reply = svc.client().generate(model="llama3.2:3b", prompt="def add(a, b):", suffix="    return c", stream=False)
    assert reply.done and reply.response
    sent = svc.ollama.json_bodies("/api/generate")[-1]
    assert sent["suffix"] == "    return c" and sent["prompt"] == "def add(a, b):"
    record = _last_record(svc, "api/generate")
    assert not record.usage.estimated and record.usage.completion_tokens == reply.eval_count
    with svc.http() as c:
        r = c.post(svc.api("generate"), json={"model": "llama3.2:3b", "prompt": "x", "priority": 9,
                                              "options": {"seed": 7}, "stream": False})
    assert r.status_code == 200
    sent = svc.ollama.json_bodies("/api/generate")[-1]
    assert "priority" not in sent and sent["options"] == {"seed": 7}


def test_embed_and_legacy_embeddings(svc: Service) -> None:
    svc.records.clear()
    client = svc.client()
    embedded = client.embed(model="llama3.2:3b", input=["one", "two words"])
    assert len(embedded.embeddings) == 2 and len(embedded.embeddings[0]) == 8
    assert _last_record(svc, "api/embed").usage == Usage(embedded.prompt_eval_count, 0, embedded.prompt_eval_count)
    legacy = client.embeddings(model="llama3.2:3b", prompt="four words of text")
    assert len(legacy.embedding) == 8
    usage = _last_record(svc, "api/embeddings").usage
    assert usage.estimated and usage.prompt_tokens == len("four words of text") // 4 + 1 and usage.completion_tokens == 0


def test_show_by_model_or_legacy_name(svc: Service) -> None:
    shown = svc.client().show("llama3.2:3b")
    assert shown.details.family == "llama" and "completion" in shown.capabilities
    with svc.http() as c:
        r = c.post(svc.api("show"), json={"name": "llama3.2:3b"})
    assert r.status_code == 200 and r.json()["details"]["family"] == "llama"
    sent = svc.ollama.json_bodies("/api/show")[-1]
    assert sent == {"model": "llama3.2:3b"}   # the checked model, and only it, reaches the backend


def test_a_name_without_tag_means_latest(svc: Service) -> None:
    reply = svc.client().chat(model="phi3", messages=[{"role": "user", "content": "x"}], stream=False)
    assert reply.done
    assert svc.second.json_bodies("/api/chat")[-1]["model"] == "phi3:latest"


def test_tags_are_the_ollama_models_v1_lists(svc: Service) -> None:
    for who, expected in (("member_a", OLLAMA_MODELS | SECOND_MODELS), ("allow_a", {"llama3.2:3b"})):
        with svc.http(who) as c:
            listed = {m["id"] for m in c.get(f"/proxy/{svc.domain()}/v1/models").json()["data"]}
        tags = svc.client(who).list()
        names = [m.model for m in tags.models]
        assert set(names) == listed - {VLLM_MODEL, "sql-lora"} == expected
        assert len(names) == len(set(names))
    entry = next(m for m in svc.client().list().models if m.model == "jdoe/tinyllama:1.1b")
    assert entry.size == 637_700_138 and entry.details.parameter_size == "1.1B" and len(entry.digest) == 64
    assert entry.modified_at is not None and entry.details.families == ["llama"]
    assert not [r for r in svc.ollama.requests if r.path == "/api/tags" and r.headers.get("authorization")]


def test_ps_only_models_the_key_may_use_on_their_own_backend(svc: Service, caplog) -> None:
    svc.ollama.loaded = {"llama3.2:3b", "jdoe/tinyllama:1.1b"}
    svc.second.loaded = {"llama3.2:3b", "phi3:latest"}   # its llama3.2:3b is shadowed: nobody routes there
    names = sorted(m.model for m in svc.client().ps().models)
    assert names == ["jdoe/tinyllama:1.1b", "llama3.2:3b", "phi3:latest"]
    assert [m.model for m in svc.client("allow_a").ps().models] == ["llama3.2:3b"]
    svc.second.answering = False
    with caplog.at_level(logging.WARNING, logger="enclave.inference"):
        names = sorted(m.model for m in svc.client().ps().models)
    assert names == ["jdoe/tinyllama:1.1b", "llama3.2:3b"]
    assert any("ollama2" in r.getMessage() and "/api/ps" in r.getMessage() for r in caplog.records)


def test_version_of_an_up_backend_else_503(svc: Service) -> None:
    with svc.http() as c:
        assert c.get(svc.api("version")).json() == {"version": "0.12.6"}
        svc.ollama.answering = False
        assert c.get(svc.api("version")).json() == {"version": "0.12.6"}   # the second backend answers
        svc.second.answering = False
        assert "No Ollama backend" in _ollama_error(c.get(svc.api("version")), 503)


# ---- streaming -----------------------------------------------------------------------------------------
def test_stream_relayed_line_by_line(svc: Service) -> None:
    interval = 0.4
    svc.ollama.event_interval = interval
    svc.ollama.tokens = ["one", " two", " three", " four"]
    arrivals: list[tuple[float, int]] = []
    for _ in svc.client().generate(model="llama3.2:3b", prompt="count", stream=True):
        arrivals.append((time.monotonic(), svc.ollama.streams_finished))
    assert len(arrivals) == 5
    finished_before = arrivals[0][1]
    # every line but the last reached the client while the fake was still generating the next one
    assert all(count == finished_before for _, count in arrivals[:-1])
    gaps = [b[0] - a[0] for a, b in zip(arrivals, arrivals[1:])]
    assert all(gap > interval / 2 for gap in gaps), gaps


def test_mid_stream_error_line_reaches_the_client(svc: Service) -> None:
    svc.ollama.error_line_after = 2
    received = []
    with pytest.raises(ollama.ResponseError) as err:
        for part in svc.client().chat(model="llama3.2:3b", messages=[{"role": "user", "content": "x"}],
                                      stream=True):
            received.append(part)
    assert len(received) == 2 and "unexpected EOF" in err.value.error


def test_backend_cut_mid_stream_ends_with_an_error_line(svc: Service) -> None:
    svc.ollama.fail_after = 3
    with svc.http() as c:
        r = c.post(svc.api("chat"), json={"model": "llama3.2:3b", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 200 and r.content.endswith(b"\n")
    lines = [json.loads(line) for line in r.content.splitlines()]   # no half line: every line parses
    assert len(lines) == 4 and all(line["done"] is False for line in lines[:3])
    assert lines[-1] == {"error": "The model's backend failed mid-stream."}
    record = _last_record(svc, "api/chat")
    assert record.outcome == "backend_error" and record.usage.estimated and record.usage.completion_tokens == 3
    with pytest.raises(ollama.ResponseError) as err:
        list(svc.client().chat(model="llama3.2:3b", messages=[{"role": "user", "content": "x"}], stream=True))
    assert "failed mid-stream" in err.value.error


# ---- access -------------------------------------------------------------------------------------------
def test_forbidden_and_unknown_models_look_alike(svc: Service) -> None:
    with svc.http("allow_a") as c:
        for route, body in (("chat", {"messages": []}), ("generate", {"prompt": "x"}), ("embed", {"input": "x"}),
                            ("embeddings", {"prompt": "x"}), ("show", {})):
            for hidden in ("jdoe/tinyllama:1.1b", VLLM_MODEL):
                forbidden = c.post(svc.api(route), json={"model": hidden, **body})
                unknown = c.post(svc.api(route), json={"model": "nope:1b", **body})
                assert _ollama_error(forbidden, 404).replace(hidden, "X") == \
                    _ollama_error(unknown, 404).replace("nope:1b", "X") == 'model "X" not found'
    with pytest.raises(ollama.ResponseError) as err:
        svc.client("allow_a").chat(model="jdoe/tinyllama:1.1b", messages=[])
    assert err.value.status_code == 404 and err.value.error == 'model "jdoe/tinyllama:1.1b" not found'


def test_a_vllm_model_points_to_the_openai_route(svc: Service) -> None:
    with svc.http() as c:
        for route, body, where in (("chat", {"messages": []}, "v1/chat/completions"),
                                   ("generate", {"prompt": "x"}, "v1/completions"),
                                   ("embed", {"input": "x"}, "v1/embeddings"),
                                   ("show", {}, f"v1/models/{VLLM_MODEL}")):
            message = _ollama_error(c.post(svc.api(route), json={"model": VLLM_MODEL, **body}), 404)
            assert f"/proxy/{svc.domain()}/{where}" in message and "vLLM" in message
    assert not [r for r in svc.vllm.requests if r.method == "POST"]


def test_scopes_and_domains(svc: Service) -> None:
    chat = {"model": "llama3.2:3b", "messages": [], "stream": False}
    with svc.http("noscope_a") as c:   # models:infer only
        assert c.post(svc.api("chat"), json=chat).status_code == 200
        assert "models:read" in _ollama_error(c.get(svc.api("tags")), 403)
        assert "models:read" in _ollama_error(c.post(svc.api("show"), json={"model": "llama3.2:3b"}), 403)
    with svc.http("member_b") as c:
        assert "not a member" in _ollama_error(c.post(svc.api("chat"), json=chat), 403)
        assert c.post(svc.api("chat", "B"), json=chat).status_code == 200


def test_management_routes_are_refused_naming_the_admin_api(svc: Service) -> None:
    client = svc.client("superadmin")
    calls = {"pull": lambda: client.pull("qwen2.5:0.5b"), "push": lambda: client.push("llama3.2:3b"),
             "create": lambda: client.create("mine", from_="llama3.2:3b"),
             "copy": lambda: client.copy("llama3.2:3b", "mine:1"), "delete": lambda: client.delete("llama3.2:3b")}
    for action, call in calls.items():
        with pytest.raises(ollama.ResponseError) as err:
            call()
        assert err.value.status_code == 403, action
        assert f"`{action}` is not available through the gateway" in err.value.error
        assert "POST /admin/models" in err.value.error and "DELETE /admin/models/{model}" in err.value.error
    with svc.http("member_a") as c:
        for method in ("GET", "PUT", "PATCH"):
            assert "admin API" in _ollama_error(c.request(method, svc.api("pull")), 403)
    assert not [r for r in svc.ollama.requests if r.path in ("/api/pull", "/api/delete")]
    with svc.http(None) as c:
        _ollama_error(c.post(svc.api("pull"), json={"model": "x"}), 401)


# ---- every error in Ollama's shape -------------------------------------------------------------------
def test_errors_before_and_around_the_route_use_ollamas_shape(svc: Service) -> None:
    chat = {"model": "llama3.2:3b", "messages": []}
    with svc.http(None) as c:
        r = c.post(svc.api("chat"), json=chat)
        assert _ollama_error(r, 401) and r.headers["www-authenticate"].startswith("Bearer")
        assert _ollama_error(c.get(svc.api("tags"), headers={"Authorization": "Bearer nope"}), 401)
    with svc.http() as c:
        assert "not valid JSON" in _ollama_error(c.post(svc.api("chat"), content=b"{nope"), 400)
        assert "model" in _ollama_error(c.post(svc.api("generate"), json={"prompt": "x"}), 400)
        assert "larger than" in _ollama_error(c.post(svc.api("chat"), content=b"x" * (2 * 1024 * 1024)), 413)
        r = c.get(svc.api("chat"))
        assert _ollama_error(r, 405) and "POST" in r.headers["allow"]
        assert _ollama_error(c.get(svc.api("no-such-route")), 404) == "No such route."
        # the OpenAI routes keep the OpenAI envelope
        assert c.post(f"/proxy/{svc.domain()}/v1/chat/completions", content=b"{nope").json()["error"]["code"] \
            == "invalid_json"


def test_backend_failures_use_ollamas_shape(svc: Service) -> None:
    chat = {"model": "llama3.2:3b", "messages": [], "stream": False}
    with svc.http() as c:
        svc.ollama.upstream_status = (400, "invalid options: num_ctx")
        assert _ollama_error(c.post(svc.api("chat"), json=chat), 400) == "invalid options: num_ctx"
        svc.ollama.upstream_status = (500, "llama runner process has terminated")
        assert "llama runner process has terminated" in _ollama_error(c.post(svc.api("chat"), json=chat), 502)
        svc.ollama.upstream_status = None
        svc.ollama.delay = 3 * FIRST_BYTE_TIMEOUT
        assert "did not answer" in _ollama_error(c.post(svc.api("chat"), json=chat), 504)
        svc.ollama.delay = 0.0
        svc.ollama.answering = False
        assert "cannot be reached" in _ollama_error(c.post(svc.api("chat"), json=chat), 502)


def test_openapi_documents_the_native_routes(svc: Service) -> None:
    with svc.http(None) as c:
        paths = c.get("/openapi.json").json()["paths"]
    for route in ("chat", "generate", "embed", "embeddings", "show", "tags", "ps", "version"):
        operations: dict[str, Any] = paths[f"/proxy/{{domain_id}}/api/{route}"]
        (operation,) = operations.values()
        error = operation["responses"]["404"]["content"]["application/json"]["schema"]
        assert error == {"$ref": "#/components/schemas/OllamaError"}
    assert not [p for p in paths if p.endswith(("/api/pull", "/api/delete"))]
