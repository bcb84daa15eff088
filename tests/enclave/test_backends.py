"""Backend drivers against the wire fakes, over real loopback sockets."""

from __future__ import annotations

import json
from datetime import datetime

import httpx
import pytest
from pydantic import ValidationError

from enclave.backends import BackendConfig, ModelCard, OllamaBackend, VllmBackend, make_backend
from enclave.backends.errors import (
    BackendUnavailable,
    InvalidModelName,
    ModelNotFound,
    PullError,
    PullModelNotFound,
    UnsupportedOperation,
)
from enclave.backends.ollama import ollama_namespace, unix_seconds
from tests.fakes import FakeOllama, FakeVllm, ollama_model, vllm_lora, vllm_model
from tests.fakes.fixtures import VLLM_TEST_KEY, fake_ollama, fake_vllm, fake_vllm_with_key  # noqa: F401


def ollama_config(url: str, **extra) -> BackendConfig:
    return BackendConfig(name=extra.pop("name", "ollama"), kind="ollama", base_url=url, **extra)


def vllm_config(url: str, **extra) -> BackendConfig:
    return BackendConfig(name=extra.pop("name", "vllm"), kind="vllm", base_url=url, **extra)


@pytest.fixture
async def ollama(fake_ollama: FakeOllama):
    driver = OllamaBackend(ollama_config(fake_ollama.base_url, read_timeout=2.0))
    yield driver
    await driver.aclose()


@pytest.fixture
async def vllm(fake_vllm: FakeVllm):
    driver = VllmBackend(vllm_config(fake_vllm.base_url, read_timeout=2.0))
    yield driver
    await driver.aclose()


# --- configuration and cards -------------------------------------------------------------------
def test_backend_config_normalises_and_hides_the_key():
    config = BackendConfig(name="gpu-1", kind="vllm", base_url="http://10.0.0.5:8000/", api_key="s3cr3t-token")
    assert config.base_url == "http://10.0.0.5:8000"
    assert "s3cr3t-token" not in repr(config) and "s3cr3t-token" not in str(config.model_dump())
    assert config.api_key is not None and config.api_key.get_secret_value() == "s3cr3t-token"
    assert (config.connect_timeout, config.read_timeout, config.pull_timeout, config.priority) == (2.0, 10.0, 3600.0, 0)


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("base_url", "ftp://host", "http"),
        ("base_url", "http://user:pw@host:11434", "credentials"),
        ("base_url", "http://host:11434/?x=1", "query"),
        ("base_url", "not a url at all", "http"),
        ("name", "bad name", "name"),
        ("name", "", "name"),
        ("kind", "tgi", "kind"),
        ("read_timeout", 0, "read_timeout"),
        ("api_key", "has space", "api_key"),
        ("colour", "blue", "colour"),
    ],
)
def test_backend_config_rejects_bad_values_naming_the_key(field, value, fragment):
    data = {"name": "b", "kind": "ollama", "base_url": "http://127.0.0.1:11434", field: value}
    with pytest.raises(ValidationError) as info:
        BackendConfig(**data)
    assert fragment in str(info.value)


def test_model_card_openai_shape():
    plain = ModelCard(id="llama3.2:3b", created=1741940813, owned_by="library", backend="o", kind="ollama",
                      extras={"size": 1})
    assert plain.to_openai() == {"id": "llama3.2:3b", "object": "model", "created": 1741940813, "owned_by": "library"}
    lora = ModelCard(id="sql-lora", created=5, owned_by="vllm", backend="v", kind="vllm", root="/a/sql",
                     parent="base", max_model_len=4096)
    assert lora.to_openai() == {"id": "sql-lora", "object": "model", "created": 5, "owned_by": "vllm",
                                "root": "/a/sql", "parent": "base", "max_model_len": 4096}
    with pytest.raises(TypeError):
        plain.extras["size"] = 2  # type: ignore[index]


@pytest.mark.parametrize(
    ("name", "namespace"),
    [
        ("llama3.2:3b", "library"),
        ("llama3.2", "library"),
        ("jdoe/tinyllama:1.1b", "jdoe"),
        ("registry.example/ns/model:tag", "ns"),
        ("hf.co/bartowski/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M", "bartowski"),
        ("localhost:5000/team/model:v2", "team"),
        ("https://registry.example/ns/model:tag", "ns"),
        ("llama3.2@sha256:" + "a" * 64, "library"),
        ("jdoe/m@sha256:" + "b" * 64, "jdoe"),
    ],
)
def test_ollama_namespace_follows_parse_name(name, namespace):
    assert ollama_namespace(name) == namespace


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("2025-03-14T09:26:53.589793238+01:00", 1741940813),
        ("2024-11-02T18:01:07.12Z", 1730570467),
        ("1969-12-31T23:59:59.5Z", -1),  # floored like Go's Time.Unix(), not truncated toward zero
    ],
)
def test_unix_seconds_floors(text, seconds):
    assert unix_seconds(datetime.fromisoformat(text)) == seconds


# --- Ollama ------------------------------------------------------------------------------------
async def test_ollama_discovery_cards(ollama: OllamaBackend):
    cards = {card.id: card for card in await ollama.discover()}
    assert set(cards) == {"llama3.2:3b", "jdoe/tinyllama:1.1b", "hf.co/bartowski/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M"}
    llama = cards["llama3.2:3b"]
    assert (llama.created, llama.owned_by, llama.backend, llama.kind) == (1741940813, "library", "ollama", "ollama")
    assert (llama.root, llama.parent, llama.max_model_len) == (None, None, None)
    assert llama.extras["size"] == 2_019_393_189
    assert (llama.extras["family"], llama.extras["parameter_size"], llama.extras["quantization_level"]) == (
        "llama", "3.2B", "Q4_K_M")
    assert (cards["jdoe/tinyllama:1.1b"].created, cards["jdoe/tinyllama:1.1b"].owned_by) == (1730570467, "jdoe")
    qwen = cards["hf.co/bartowski/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M"]
    assert (qwen.created, qwen.owned_by, qwen.extras["family"]) == (1737377100, "bartowski", "qwen2")


async def test_ollama_cards_match_ollamas_own_openai_listing(ollama: OllamaBackend, fake_ollama: FakeOllama):
    """Our cards equal what Ollama's /v1/models says for the same models (openai.go toListCompletion)."""
    ours = sorted((card.to_openai() for card in await ollama.discover()), key=lambda c: c["id"])
    theirs = sorted(httpx.get(f"{fake_ollama.base_url}/v1/models").json()["data"], key=lambda c: c["id"])
    assert ours == theirs


async def test_ollama_empty_model_list():
    with FakeOllama(models=[]) as fake:
        driver = OllamaBackend(ollama_config(fake.base_url))
        assert await driver.discover() == []
        await driver.aclose()


@pytest.mark.parametrize("kind", ["not_json", "bad_shape", "html"])
async def test_ollama_malformed_tags_is_unavailable_with_reason(ollama, fake_ollama, kind):
    fake_ollama.malformed = kind
    with pytest.raises(BackendUnavailable) as info:
        await ollama.discover()
    assert info.value.backend == "ollama"
    assert info.value.reason.startswith("malformed response from GET /api/tags")


async def test_ollama_entry_without_timezone_is_malformed():
    with FakeOllama(models=[ollama_model("x:1", modified_at="2025-01-01T00:00:00")]) as fake:
        driver = OllamaBackend(ollama_config(fake.base_url))
        with pytest.raises(BackendUnavailable, match="modified_at"):
            await driver.discover()
        await driver.aclose()


async def test_ollama_refused_and_timeout_reasons(fake_ollama: FakeOllama):
    driver = OllamaBackend(ollama_config(fake_ollama.base_url, read_timeout=0.2, connect_timeout=0.5))
    fake_ollama.delay = 2.0
    with pytest.raises(BackendUnavailable) as slow:
        await driver.discover()
    assert "read timeout" in slow.value.reason
    fake_ollama.delay = 0.0
    fake_ollama.answering = False
    with pytest.raises(BackendUnavailable) as refused:
        await driver.discover()
    assert refused.value.reason.startswith("cannot connect")
    fake_ollama.answering = True
    assert len(await driver.discover()) == 3
    await driver.aclose()


async def test_ollama_http_error_status_is_reported(fake_ollama: FakeOllama):
    driver = OllamaBackend(ollama_config(fake_ollama.base_url + "/nowhere"))
    with pytest.raises(BackendUnavailable, match=r"HTTP 404 from GET /api/tags"):
        await driver.discover()
    await driver.aclose()


async def test_ollama_pull_streams_every_progress_object(ollama: OllamaBackend, fake_ollama: FakeOllama):
    progress = [p async for p in ollama.pull("qwen2.5:0.5b")]
    statuses = [p["status"] for p in progress]
    assert statuses[0] == "pulling manifest"
    assert statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
    layer_lines = [p for p in progress if "digest" in p]
    assert len(layer_lines) == 8  # two layers, a first line without "completed" then three steps each
    assert "completed" not in layer_lines[0] and layer_lines[3]["completed"] == layer_lines[3]["total"]
    assert all(p["status"] == f"pulling {p['digest'][7:19]}" for p in layer_lines)
    assert "qwen2.5:0.5b" in fake_ollama.model_names
    sent = [r for r in fake_ollama.requests if r.path == "/api/pull"][-1]
    assert sent.method == "POST" and json.loads(sent.body) == {"model": "qwen2.5:0.5b", "stream": True}


async def test_ollama_pull_unknown_model_is_typed(ollama: OllamaBackend):
    seen = []
    with pytest.raises(PullModelNotFound) as info:
        async for p in ollama.pull("no-such-model:7b"):
            seen.append(p)
    assert seen == [{"status": "pulling manifest"}]
    assert info.value.message == "pull model manifest: file does not exist"
    assert isinstance(info.value, ModelNotFound) and isinstance(info.value, PullError)


async def test_ollama_pull_error_mid_stream(ollama: OllamaBackend, fake_ollama: FakeOllama):
    fake_ollama.pull_error = "max retries exceeded: unexpected EOF"
    seen = []
    with pytest.raises(PullError) as info:
        async for p in ollama.pull("qwen2.5:0.5b"):
            seen.append(p)
    assert not isinstance(info.value, PullModelNotFound)
    assert info.value.message == "max retries exceeded: unexpected EOF"
    assert len(seen) == 5 and "qwen2.5:0.5b" not in fake_ollama.model_names


async def test_ollama_pull_refused_is_unavailable(fake_ollama: FakeOllama):
    driver = OllamaBackend(ollama_config(fake_ollama.base_url))
    fake_ollama.answering = False
    with pytest.raises(BackendUnavailable, match="cannot connect"):
        async for _ in driver.pull("qwen2.5:0.5b"):
            pass
    await driver.aclose()


async def test_ollama_pull_rejects_bad_names(ollama: OllamaBackend):
    for bad in ["", "has space", "a\nb", "../../etc", "x" * 400]:
        with pytest.raises(InvalidModelName):
            async for _ in ollama.pull(bad):
                pass


async def test_ollama_delete(ollama: OllamaBackend, fake_ollama: FakeOllama):
    await ollama.delete("jdoe/tinyllama:1.1b")
    assert "jdoe/tinyllama:1.1b" not in fake_ollama.model_names
    with pytest.raises(ModelNotFound) as info:
        await ollama.delete("jdoe/tinyllama:1.1b")
    assert info.value.detail == "model 'jdoe/tinyllama:1.1b' not found"
    assert info.value.backend == "ollama"
    sent = [r for r in fake_ollama.requests if r.path == "/api/delete"]
    assert [r.method for r in sent] == ["DELETE", "DELETE"]


# --- vLLM --------------------------------------------------------------------------------------
async def test_vllm_discovery_keeps_root_parent_max_model_len(vllm: VllmBackend):
    cards = {card.id: card for card in await vllm.discover()}
    base = cards["meta-llama/Llama-3.1-8B-Instruct"]
    assert (base.root, base.parent, base.max_model_len, base.owned_by, base.kind) == (
        "/models/Llama-3.1-8B-Instruct", None, 131072, "vllm", "vllm")
    lora = cards["sql-lora"]
    assert (lora.root, lora.parent, lora.max_model_len) == (
        "/adapters/sql-lora", "meta-llama/Llama-3.1-8B-Instruct", None)
    assert lora.to_openai() == {"id": "sql-lora", "object": "model", "created": lora.created, "owned_by": "vllm",
                                "root": "/adapters/sql-lora", "parent": "meta-llama/Llama-3.1-8B-Instruct"}


async def test_vllm_created_is_first_seen_and_stable(vllm: VllmBackend, fake_vllm: FakeVllm, monkeypatch):
    import enclave.backends.vllm as vllm_module

    monkeypatch.setattr(vllm_module.time, "time", lambda: 1_700_000_000.7)
    first = {card.id: card.created for card in await vllm.discover()}
    assert set(first.values()) == {1_700_000_000}
    monkeypatch.setattr(vllm_module.time, "time", lambda: 1_800_000_000.0)
    fake_vllm.set_served([vllm_model("meta-llama/Llama-3.1-8B-Instruct", root="/models/Llama-3.1-8B-Instruct"),
                          vllm_model("Qwen/Qwen2.5-7B-Instruct", max_model_len=32768)])
    second = {card.id: card.created for card in await vllm.discover()}
    assert second == {"meta-llama/Llama-3.1-8B-Instruct": 1_700_000_000, "Qwen/Qwen2.5-7B-Instruct": 1_800_000_000}


async def test_vllm_owned_by_falls_back_to_backend_name():
    served = [{**vllm_model("m"), "owned_by": None}, {**vllm_model("n"), "owned_by": "acme"}]
    with FakeVllm(served=served) as fake:
        driver = VllmBackend(vllm_config(fake.base_url, name="gpu-west"))
        owners = {card.id: card.owned_by for card in await driver.discover()}
        await driver.aclose()
    assert owners == {"m": "gpu-west", "n": "acme"}


async def test_vllm_api_key_is_sent_as_bearer(fake_vllm_with_key: FakeVllm):
    driver = VllmBackend(vllm_config(fake_vllm_with_key.base_url, api_key=VLLM_TEST_KEY))
    assert {card.id for card in await driver.discover()} == {"meta-llama/Llama-3.1-8B-Instruct", "sql-lora"}
    assert fake_vllm_with_key.requests[-1].headers["authorization"] == f"Bearer {VLLM_TEST_KEY}"
    await driver.aclose()


async def test_vllm_missing_or_wrong_key_is_unavailable(fake_vllm_with_key: FakeVllm):
    missing = VllmBackend(vllm_config(fake_vllm_with_key.base_url))
    with pytest.raises(BackendUnavailable) as info:
        await missing.discover()
    assert info.value.reason == 'HTTP 401 from GET /v1/models (it needs an api_key): {"error":"Unauthorized"}'
    wrong = VllmBackend(vllm_config(fake_vllm_with_key.base_url, api_key="not-the-key"))
    with pytest.raises(BackendUnavailable) as info:
        await wrong.discover()
    assert "an api_key is configured but refused" in info.value.reason
    assert "not-the-key" not in info.value.reason
    await missing.aclose()
    await wrong.aclose()


@pytest.mark.parametrize("kind", ["not_json", "bad_shape", "html"])
async def test_vllm_malformed_models_is_unavailable(vllm, fake_vllm, kind):
    fake_vllm.malformed = kind
    with pytest.raises(BackendUnavailable, match=r"^backend 'vllm' is unavailable: malformed response from GET /v1/models"):
        await vllm.discover()


async def test_vllm_cannot_pull_or_delete(vllm: VllmBackend):
    with pytest.raises(UnsupportedOperation, match="cannot pull models: vLLM serves the models it was started with"):
        vllm.pull("anything")
    with pytest.raises(UnsupportedOperation, match="--lora-modules"):
        await vllm.delete("sql-lora")


async def test_vllm_timeout(fake_vllm: FakeVllm):
    driver = VllmBackend(vllm_config(fake_vllm.base_url, read_timeout=0.2))
    fake_vllm.delay = 2.0
    with pytest.raises(BackendUnavailable, match="0.2s read timeout"):
        await driver.discover()
    await driver.aclose()


def test_make_backend_picks_the_driver():
    assert isinstance(make_backend(ollama_config("http://127.0.0.1:1")), OllamaBackend)
    assert isinstance(make_backend(vllm_config("http://127.0.0.1:1")), VllmBackend)
    with pytest.raises(ValueError):
        OllamaBackend(vllm_config("http://127.0.0.1:1"))


async def test_lora_helper_shape():
    assert vllm_lora("a", parent="b") == {"id": "a", "root": "/adapters/a", "parent": "b", "max_model_len": None}


def test_openai_json_is_byte_identical_to_json_response():
    from starlette.responses import JSONResponse

    from enclave.registry import openai_model_list

    cards = [
        ModelCard(id="llama3.2:3b", created=1741940813, owned_by="library", backend="o", kind="ollama"),
        ModelCard(id="modèle/ünï:1", created=-1, owned_by="modèle", backend="o", kind="ollama"),
        ModelCard(id='q"uote\\', created=5, owned_by="vllm", backend="v", kind="vllm", root="/m", parent="b",
                  max_model_len=8192),
    ]
    for card in cards:
        assert card.openai_json() == JSONResponse(card.to_openai()).body
    expected = JSONResponse({"object": "list", "data": [card.to_openai() for card in cards]}).body
    assert openai_model_list(cards) == expected
    assert openai_model_list([]) == JSONResponse({"object": "list", "data": []}).body
    assert json.loads(openai_model_list(cards))["data"][1]["id"] == "modèle/ünï:1"


async def test_ollama_null_model_list_means_none():
    """Some Ollama versions render an empty model list as null."""
    from enclave.backends.ollama import _Tags

    assert _Tags.model_validate({"models": None}).models is None
    driver = OllamaBackend(ollama_config("http://127.0.0.1:9"))
    driver.get_json = _returns({"models": None})  # type: ignore[method-assign]
    assert await driver.discover() == []


def _returns(value):
    async def get_json(path: str):
        return value

    return get_json


@pytest.mark.parametrize("name", ["llama3.2:3b", "hf.co/bartowski/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M", "jdoe/m:v1.5",
                                  "localhost:5000/team/model:v2", "m@sha256:" + "c" * 64, "Mixtral_8x7B:q4_0"])
def test_model_names_backends_accept(name):
    from enclave.backends.base import check_model_name

    assert check_model_name(name) == name


@pytest.mark.parametrize("name", ["", " llama", "llama 3", "a\tb", "-rf", "../x", "a//b", "x" * 351, "m\u00e9"])
def test_model_names_refused(name):
    from enclave.backends.base import check_model_name

    with pytest.raises(InvalidModelName):
        check_model_name(name)
