"""The ledger's counts equal the backend's: the real llama.cpp server and the Ollama fake, streamed and not, on
the OpenAI routes and Ollama's own; flagged estimated exactly when the backend reported none."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from enclave.inference.usage import Usage
from enclave.usage import UsageEntry

from tests.enclave.inference_support import Service, sse_json, start_service
from tests.fakes.ollama import FakeOllama
from tests.llama.fixtures import LlamaServer, llama_server, tiny_model  # noqa: F401

OLLAMA_MODEL = "llama3.2:3b"


@pytest.fixture(scope="module")
def svc(llama_server: LlamaServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:  # noqa: F811
    with FakeOllama() as ollama:
        backends = [({"name": "llama", "kind": "vllm"}, llama_server), ({"name": "ollama", "kind": "ollama"}, ollama)]
        with start_service(tmp_path_factory.mktemp("usage-counts"), backends) as service:  # type: ignore[list-item]
            yield service


def stored(svc: Service, response: httpx.Response) -> tuple[UsageEntry, Usage]:
    """(the ledger's entry as read back from the database, the request's InferenceRecord usage)."""
    record = svc.record(response)
    ledger = svc.server.ctx.ledger
    svc.server.run_async(ledger.flush())
    assert ledger.pending_count() == 0
    entry = svc.server.run_async(ledger.find(record.request_id))
    assert entry is not None and entry.request_id == response.headers["x-request-id"]
    assert record.usage is not None
    return entry, record.usage


def counts(entry: UsageEntry) -> Usage:
    return Usage(entry.prompt_tokens, entry.completion_tokens, entry.total_tokens, estimated=entry.estimated)


def openai_reported(response: httpx.Response, stream: bool) -> Usage | None:
    """The usage the backend reported in an OpenAI answer the client received (None: none)."""
    if stream:
        events, _ = sse_json(response.text)
        found = [e["usage"] for e in events if e.get("usage")]
        doc = found[-1] if found else None
    else:
        doc = response.json().get("usage")
    if not doc:
        return None
    return Usage(doc["prompt_tokens"], doc.get("completion_tokens", 0), doc["total_tokens"])


def ollama_reported(response: httpx.Response) -> Usage:
    final = json.loads(response.content.strip().split(b"\n")[-1])
    assert final["done"] is True
    prompt, completion = final.get("prompt_eval_count", 0), final.get("eval_count", 0)
    return Usage(prompt, completion, prompt + completion)


def body(route: str, model: str, stream: bool) -> dict[str, Any]:
    prompt = "Count the usage of this request, please"
    doc: dict[str, Any] = {"model": model, "stream": stream, "max_tokens": 12}
    if route == "chat/completions":
        doc["messages"] = [{"role": "user", "content": prompt}]
    else:
        doc["prompt"] = prompt
    if stream:
        doc["stream_options"] = {"include_usage": True}
    return doc


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("route", ["chat/completions", "completions"])
def test_llama_cpp_counts(svc: Service, llama_server: LlamaServer, route: str, stream: bool) -> None:  # noqa: F811
    with svc.http() as c:
        r = c.post(svc.url("A", route), json=body(route, llama_server.model, stream))
    assert r.status_code == 200, r.text
    entry, served = stored(svc, r)
    reported = openai_reported(r, stream)
    assert (entry.model, entry.backend, entry.route, entry.stream, entry.status, entry.outcome) == (
        llama_server.model, "llama", route, stream, 200, "completed")
    assert entry.pat_id == svc.world.pat_ids["member_a"] and entry.domain_id == svc.world.domains["A"]
    assert counts(entry) == served
    if stream:   # llama.cpp ignores stream_options.include_usage: an estimate, flagged
        assert reported is None and entry.estimated and entry.prompt_tokens > 0
    else:        # reported exactly
        assert reported is not None and not entry.estimated and counts(entry) == reported
    if route == "chat/completions":   # (the tiny model may end a bare completion at once)
        assert entry.completion_tokens > 0


def test_llama_cpp_embeddings_counts(svc: Service, llama_server: LlamaServer) -> None:  # noqa: F811
    with svc.http() as c:
        r = c.post(svc.url("A", "embeddings"), json={"model": llama_server.model, "input": ["one two three"]})
    assert r.status_code == 200, r.text
    entry, served = stored(svc, r)
    reported = openai_reported(r, False)
    assert counts(entry) == served
    assert entry.estimated == (reported is None)
    if reported is not None:
        assert (entry.prompt_tokens, entry.total_tokens) == (reported.prompt_tokens, reported.total_tokens)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("route", ["chat/completions", "completions"])
def test_ollama_openai_routes_counts(svc: Service, route: str, stream: bool) -> None:
    with svc.http() as c:
        r = c.post(svc.url("A", route), json=body(route, OLLAMA_MODEL, stream))
    assert r.status_code == 200, r.text
    entry, served = stored(svc, r)
    reported = openai_reported(r, stream)
    assert counts(entry) == served and entry.backend == "ollama"
    assert reported is not None and not entry.estimated and counts(entry) == reported


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("route", ["chat", "generate"])
def test_ollama_native_routes_counts(svc: Service, route: str, stream: bool) -> None:
    doc: dict[str, Any] = {"model": OLLAMA_MODEL, "stream": stream}
    doc.update({"messages": [{"role": "user", "content": "hello"}]} if route == "chat" else {"prompt": "hello"})
    with svc.http() as c:
        r = c.post(f"{svc.server.url}/proxy/{svc.world.domains['A']}/api/{route}", json=doc)
    assert r.status_code == 200, r.text
    entry, served = stored(svc, r)
    assert entry.route == f"api/{route}" and entry.stream is stream
    assert counts(entry) == served == ollama_reported(r) and not entry.estimated
    assert entry.completion_tokens > 0


def test_ollama_embed_routes_counts(svc: Service) -> None:
    """Ollama's embed reports prompt_eval_count (exact); the legacy embeddings route reports nothing (estimated);
    the OpenAI embeddings route on an Ollama backend reports usage (exact)."""
    domain = svc.world.domains["A"]
    with svc.http() as c:
        embed = c.post(f"{svc.server.url}/proxy/{domain}/api/embed", json={"model": OLLAMA_MODEL,
                                                                          "input": ["one two", "three"]})
        legacy = c.post(f"{svc.server.url}/proxy/{domain}/api/embeddings", json={"model": OLLAMA_MODEL,
                                                                                "prompt": "one two three four"})
        openai = c.post(svc.url("A", "embeddings"), json={"model": OLLAMA_MODEL, "input": "one two"})
    for r in (embed, legacy, openai):
        assert r.status_code == 200, r.text
    entry, served = stored(svc, embed)
    reported = embed.json()["prompt_eval_count"]
    assert entry.route == "api/embed" and counts(entry) == served == Usage(reported, 0, reported)
    assert reported > 0 and not entry.estimated
    entry, served = stored(svc, legacy)
    assert "prompt_eval_count" not in legacy.json()
    assert entry.route == "api/embeddings" and counts(entry) == served and entry.estimated
    assert (entry.prompt_tokens, entry.completion_tokens) == (-(-len("one two three four") // 4), 0)
    entry, served = stored(svc, openai)
    assert counts(entry) == served == openai_reported(openai, False) and not entry.estimated
