"""The wire fakes themselves: their answers have the shapes the real servers give (see their docstrings)."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.fakes import FakeOllama, FakeVllm
from tests.fakes.fixtures import VLLM_TEST_KEY, fake_ollama, fake_vllm, fake_vllm_with_key  # noqa: F401


def test_ollama_root_version_and_tags_shape(fake_ollama: FakeOllama):
    root = httpx.get(fake_ollama.base_url + "/")
    assert (root.status_code, root.text, root.headers["content-type"].split(";")[0]) == (
        200, "Ollama is running", "text/plain")
    assert httpx.get(fake_ollama.base_url + "/api/version").json() == {"version": "0.12.6"}
    models = httpx.get(fake_ollama.base_url + "/api/tags").json()["models"]
    assert [m["name"] for m in models] == [  # newest modified_at first, as Ollama sorts
        "llama3.2:3b", "hf.co/bartowski/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M", "jdoe/tinyllama:1.1b"]
    for m in models:
        assert set(m) == {"name", "model", "modified_at", "size", "digest", "details"}
        assert set(m["details"]) == {"parent_model", "format", "family", "families", "parameter_size",
                                     "quantization_level"}
        assert len(m["digest"]) == 64 and m["name"] == m["model"]


def test_ollama_pull_ndjson_and_errors(fake_ollama: FakeOllama):
    with httpx.stream("POST", fake_ollama.base_url + "/api/pull", json={"model": "nope"}) as response:
        assert response.status_code == 200  # the error arrives inside a 200 stream, as Ollama does
        assert response.headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(line) for line in response.iter_lines() if line]
    assert lines == [{"status": "pulling manifest"}, {"error": "pull model manifest: file does not exist"}]
    single = httpx.post(fake_ollama.base_url + "/api/pull", json={"name": "qwen2.5:0.5b", "stream": False})
    assert (single.status_code, single.json()) == (200, {"status": "success"})
    assert "qwen2.5:0.5b" in fake_ollama.model_names
    missing = httpx.post(fake_ollama.base_url + "/api/pull", json={})
    assert (missing.status_code, missing.json()) == (400, {"error": "model is required"})


def test_ollama_untagged_names_get_latest(fake_ollama: FakeOllama):
    fake_ollama.catalog["phi3:latest"] = {**fake_ollama.catalog["qwen2.5:0.5b"], "name": "phi3:latest",
                                          "model": "phi3:latest"}
    httpx.post(fake_ollama.base_url + "/api/pull", json={"model": "phi3", "stream": False})
    assert "phi3:latest" in fake_ollama.model_names
    gone = httpx.request("DELETE", fake_ollama.base_url + "/api/delete", json={"model": "phi3"})
    assert (gone.status_code, gone.content) == (200, b"")
    again = httpx.request("DELETE", fake_ollama.base_url + "/api/delete", json={"model": "phi3"})
    assert (again.status_code, again.json()) == (404, {"error": "model 'phi3' not found"})


def test_ollama_openai_compat(fake_ollama: FakeOllama):
    listing = httpx.get(fake_ollama.base_url + "/v1/models").json()
    assert listing["object"] == "list"
    assert {"id": "jdoe/tinyllama:1.1b", "object": "model", "created": 1730570467, "owned_by": "jdoe"} in listing["data"]
    missing = httpx.get(fake_ollama.base_url + "/v1/models/none:1")
    assert missing.status_code == 404
    assert missing.json() == {"error": {"message": "model 'none:1' not found", "type": "not_found_error",
                                        "param": None, "code": None}}


def test_vllm_model_list_shape(fake_vllm: FakeVllm):
    first = httpx.get(fake_vllm.base_url + "/v1/models").json()
    assert first["object"] == "list"
    base, lora = first["data"]
    assert set(base) == {"id", "object", "created", "owned_by", "root", "parent", "max_model_len", "permission"}
    assert (base["owned_by"], base["parent"], lora["max_model_len"]) == ("vllm", None, None)
    permission = base["permission"][0]
    assert permission["object"] == "model_permission" and permission["id"].startswith("modelperm-")
    assert (permission["allow_sampling"], permission["allow_fine_tuning"], permission["organization"]) == (
        True, False, "*")
    second = httpx.get(fake_vllm.base_url + "/v1/models").json()
    assert second["data"][0]["permission"][0]["id"] != permission["id"]  # fresh per request, like vLLM


def test_vllm_api_key_middleware(fake_vllm_with_key: FakeVllm):
    url = fake_vllm_with_key.base_url
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": VLLM_TEST_KEY}):
        refused = httpx.get(url + "/v1/models", headers=headers)
        assert (refused.status_code, refused.json()) == (401, {"error": "Unauthorized"})
    ok = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {VLLM_TEST_KEY}"})
    assert ok.status_code == 200
    health = httpx.get(url + "/health")  # public even with --api-key
    assert (health.status_code, health.content) == (200, b"")
    assert httpx.get(url + "/version").json() == {"version": "0.11.0"}
    fake_vllm_with_key.healthy = False
    assert httpx.get(url + "/health").status_code == 503


def test_answering_toggle_refuses_then_serves_on_the_same_port(fake_vllm: FakeVllm):
    url = fake_vllm.base_url
    with httpx.Client() as client:
        assert client.get(url + "/version").status_code == 200
        fake_vllm.answering = False
        with pytest.raises(httpx.ConnectError):
            client.get(url + "/version")
        fake_vllm.answering = True
        assert fake_vllm.base_url == url
        assert client.get(url + "/version").status_code == 200


@pytest.mark.parametrize("kind", ["not_json", "bad_shape", "html"])
def test_malformed_modes(fake_ollama: FakeOllama, kind):
    fake_ollama.malformed = kind
    response = httpx.get(fake_ollama.base_url + "/api/tags")
    assert response.status_code == 200
    try:
        body = response.json()
    except json.JSONDecodeError:
        body = None
    assert body is None or not isinstance(body.get("models"), list)


def test_delay_then_stop_does_not_hang(fake_ollama: FakeOllama):
    fake_ollama.delay = 30.0
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(fake_ollama.base_url + "/api/version", timeout=0.2)
    fake_ollama.stop()  # returns promptly although a handler is still "sleeping"
    assert not fake_ollama.answering
