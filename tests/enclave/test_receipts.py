"""Receipts over real HTTPS: the hashes are of exactly the bytes the client sent and received (OpenAI and Ollama
routes, streamed and not, error endings and early departures included), the receipt verifies offline under the
policy of the app's simulated platform, and only the key that made the request can fetch it."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
import openai
import pytest

from attestation.atls.client import async_openai_client, openai_client
from attestation.errors import ProviderError
from attestation.policy import Policy, policy_from_yaml, sim_policy_yaml
from attestation.receipt import parse_receipt, rfc3339_utc, verify_receipt
from attestation.sim import SimPlatform
from enclave.usage.ledger import Ledger
from enclave.signer import SignerSource
from enclave.store import Store
from enclave.tokens import generate_token, token_hash

from tests.enclave.conftest import PAT_KEY, World, sim_provider
from tests.enclave.inference_support import Service, enclave_policy, start_service
from tests.fakes.ollama import FakeOllama
from tests.fakes.vllm import BASE_MODEL, FakeVllm

VLLM = BASE_MODEL
OLLAMA = "llama3.2:3b"
#: No content coding: what the client reads off the wire is what the enclave sent.
IDENTITY = {"accept-encoding": "identity", "content-type": "application/json"}


class Receipts:
    def __init__(self, service: Service, ledger: Ledger, policy: Policy) -> None:
        self.service, self.ledger, self.policy = service, ledger, policy

    @property
    def world(self) -> World:
        return self.service.world

    def domain(self, label: str = "A") -> str:
        return self.world.domains[label]

    def send(self, path: str, body: bytes, token: str = "member_a") -> tuple[httpx.Response, bytes]:
        """POST ``body`` as given and return the response with every body byte as received."""
        with self.service.http(token) as client, \
                client.stream("POST", path, content=body, headers=IDENTITY) as response:
            return response, b"".join(response.iter_raw())

    def entry(self, request_id: str, within: float = 5.0) -> Any:
        """The ledger's entry (made as the answer ends: for a client that left, a moment after it did)."""
        deadline = time.monotonic() + within
        while (found := self.service.server.run_async(self.ledger.find(request_id))) is None:
            assert time.monotonic() < deadline, f"no ledger entry for {request_id}"
            time.sleep(0.01)
        return found

    def fetch(self, request_id: str, token: str | None = "member_a", domain: str | None = None) -> httpx.Response:
        with self.service.server.client(self.world.tokens[token] if token else None) as client:
            return client.get(f"/proxy/{domain or self.domain()}/v1/receipts/{request_id}")

    def verified(self, response: httpx.Response, request: bytes, received: bytes) -> dict[str, Any]:
        """The statement of the response's receipt, after checking it verifies for these bytes."""
        request_id = response.headers["x-request-id"]
        self.entry(request_id)
        got = self.fetch(request_id)
        assert got.status_code == 200, got.text
        receipt = parse_receipt(got.content)
        result = verify_receipt(receipt, request=request, response=received, policy=self.policy)
        assert result.ok, result.error
        assert receipt.statement["request_id"] == request_id
        assert receipt.statement["response_sha256"] == hashlib.sha256(received).hexdigest()
        return receipt.statement


async def _second_key(store: Store, world: World) -> None:
    """Another key of member_a (same user, same domain): it must not get the first key's receipts."""
    token = generate_token()
    pat = await store.create_pat(user_id=world.users["member_a"], name="second", token_hash=token_hash(PAT_KEY, token),
                                 last4=token[-4:], scopes=("models:read", "models:infer"),
                                 expires_at=datetime.now(UTC) + timedelta(days=30))
    world.tokens["member_a_2"], world.pat_ids["member_a_2"] = token, pat.id


@pytest.fixture(scope="module")
def rx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Receipts]:
    tmp = tmp_path_factory.mktemp("receipts")
    # The app signs with the simulated platform in data_dir/sim (made here first, so the test knows its root).
    sim = SimPlatform.load_or_create(tmp / "sim")
    with FakeVllm() as vllm, FakeOllama() as ollama:
        with start_service(tmp, [({"name": "vllm", "kind": "vllm"}, vllm), ({"name": "ollama", "kind": "ollama"}, ollama)],
                           setup=_second_key) as service:
            ledger = service.server.ctx.ledger
            yield Receipts(service, ledger, policy_from_yaml(sim_policy_yaml(sim.fingerprint)))


@pytest.fixture(autouse=True)
def _fresh_fakes(rx: Receipts) -> None:
    rx.service.reset_fakes()


def _chat(model: str, stream: bool) -> bytes:
    """A request body with the spacing and escapes a client might use: hashed as sent, not as re-encoded."""
    return ('{"model": "%s",\n  "messages": [{"role": "user", "content": "caf\\u00e9 \\ud83d\\ude00"}],'
            ' "stream": %s }' % (model, "true" if stream else "false")).encode()


# ---- the hashes are of exactly what was sent and received ------------------------------------------------
@pytest.mark.parametrize("stream", [False, True])
def test_openai_chat_receipt_verifies(rx: Receipts, stream: bool) -> None:
    body = _chat(VLLM, stream)
    response, received = rx.send(f"/proxy/{rx.domain()}/v1/chat/completions", body)
    assert response.status_code == 200 and "content-encoding" not in response.headers
    statement = rx.verified(response, body, received)
    entry = rx.entry(response.headers["x-request-id"])
    assert statement == {"v": 1, "request_id": response.headers["x-request-id"], "time": rfc3339_utc(entry.created_at),
                         "domain_id": rx.domain(), "model": VLLM, "backend": "vllm", "route": "chat/completions",
                         "stream": stream, "status": 200, "request_sha256": hashlib.sha256(body).hexdigest(),
                         "response_sha256": hashlib.sha256(received).hexdigest()}
    if stream:
        assert received.endswith(b"data: [DONE]\n\n") and received.count(b"\n\n") > 3
    else:
        assert json.loads(received)["object"] == "chat.completion"


def test_openai_completions_and_embeddings_receipts_verify(rx: Receipts) -> None:
    for route, body in (("completions", b'{"model":"%s","prompt":"x = ","stream":true}' % VLLM.encode()),
                        ("embeddings", b'{"model":"%s","input":["a","b"]}' % VLLM.encode())):
        response, received = rx.send(f"/proxy/{rx.domain()}/v1/{route}", body)
        assert response.status_code == 200
        assert rx.verified(response, body, received)["route"] == route


@pytest.mark.parametrize("route,body,stream", [
    ("chat", b'{"model":"llama3.2:3b","messages":[{"role":"user","content":"hi"}]}', True),   # streams by default
    ("chat", b'{"model":"llama3.2:3b","messages":[{"role":"user","content":"hi"}],"stream":false}', False),
    ("generate", b'{"model": "llama3.2:3b", "prompt": "why?"}', True),
    ("generate", b'{"model":"llama3.2:3b","prompt":"why?","stream":false}', False),
    ("embed", b'{"model":"llama3.2:3b","input":"x"}', False),
])
def test_ollama_receipt_verifies(rx: Receipts, route: str, body: bytes, stream: bool) -> None:
    response, received = rx.send(f"/proxy/{rx.domain()}/api/{route}", body)
    assert response.status_code == 200
    statement = rx.verified(response, body, received)
    assert (statement["route"], statement["stream"], statement["backend"], statement["model"]) == \
        (f"api/{route}", stream, "ollama", OLLAMA)
    if stream:
        assert json.loads(received.splitlines()[-1])["done"] is True


def test_openai_route_on_ollama_backend_receipt_verifies(rx: Receipts) -> None:
    body = _chat(OLLAMA, True)
    response, received = rx.send(f"/proxy/{rx.domain()}/v1/chat/completions", body)
    assert response.status_code == 200
    assert rx.verified(response, body, received)["backend"] == "ollama"


@pytest.mark.parametrize("api", ["openai", "ollama"])
def test_a_stream_broken_mid_way_hashes_its_error_ending(rx: Receipts, api: str) -> None:
    fake = rx.service.fakes["vllm" if api == "openai" else "ollama"]
    fake.fail_after = 2
    path, body = ((f"/proxy/{rx.domain()}/v1/chat/completions", _chat(VLLM, True)) if api == "openai" else
                  (f"/proxy/{rx.domain()}/api/chat", b'{"model":"llama3.2:3b","messages":[]}'))
    response, received = rx.send(path, body)
    assert response.status_code == 200
    assert b"failed mid-stream" in received.splitlines()[-1] or b"failed mid-stream" in received[-300:]
    rx.verified(response, body, received)
    assert rx.entry(response.headers["x-request-id"]).outcome == "backend_error"


def test_a_client_that_left_early_gets_the_hash_of_what_was_sent(rx: Receipts) -> None:
    fake = rx.service.fakes["vllm"]
    fake.stall_after = 3   # three events, then silence: the relay has sent exactly those when the client leaves
    body = _chat(VLLM, True)
    with rx.service.http() as client, client.stream("POST", f"/proxy/{rx.domain()}/v1/chat/completions",
                                                     content=body, headers=IDENTITY) as response:
        received = b""
        for chunk in response.iter_raw():
            received += chunk
            if received.count(b"\n\n") >= 3:
                break
    request_id = response.headers["x-request-id"]
    entry = rx.entry(request_id)
    assert entry.outcome == "cancelled" and received.count(b"\n\n") == 3
    rx.verified(response, body, received)


def test_a_response_that_sent_no_bytes_has_no_receipt(rx: Receipts) -> None:
    rx.service.fakes["vllm"].upstream_status = (503, "busy")
    response, _ = rx.send(f"/proxy/{rx.domain()}/v1/chat/completions", _chat(VLLM, False))
    assert response.status_code == 502   # the backend's 503, before any byte of an answer
    request_id = response.headers["x-request-id"]
    assert rx.entry(request_id).response_sha256 is None
    missing = rx.fetch(request_id)
    unknown = rx.fetch(uuid.uuid4().hex)
    assert missing.status_code == unknown.status_code == 404
    assert missing.json() == unknown.json() == {"error": {"message": "Receipt not found.", "type": "invalid_request_error",
                                                          "param": None, "code": "receipt_not_found"}}


# ---- who gets it --------------------------------------------------------------------------------------
def test_only_the_key_that_made_the_request_gets_its_receipt(rx: Receipts) -> None:
    response, _ = rx.send(f"/proxy/{rx.domain()}/v1/chat/completions", _chat(VLLM, False))
    request_id = response.headers["x-request-id"]
    rx.entry(request_id)
    assert rx.fetch(request_id).status_code == 200
    assert rx.fetch(request_id, domain="domain-a").status_code == 200   # the domain by name is the same domain
    unknown = rx.fetch(uuid.uuid4().hex)
    assert unknown.status_code == 404

    def same_as_unknown(r: httpx.Response) -> bool:
        return (r.status_code, r.content, r.headers["content-type"]) == \
            (unknown.status_code, unknown.content, unknown.headers["content-type"])

    for other in ("member_a_2", "admin_a", "superadmin", "member_b", "bound_b", "noscope_a"):
        assert same_as_unknown(rx.fetch(request_id, other)), other
        assert same_as_unknown(rx.fetch(request_id, other, domain=rx.domain("B"))), other
    assert same_as_unknown(rx.fetch(request_id, domain=rx.domain("B")))      # the right key, another domain
    assert same_as_unknown(rx.fetch(request_id, domain=str(uuid.uuid4())))  # ... an unknown one
    assert same_as_unknown(rx.fetch(request_id[:-1]))                        # not the id
    assert same_as_unknown(rx.fetch(request_id + ".json"))                   # not even an id's shape
    assert rx.fetch(request_id, token=None).status_code == 401
    assert rx.fetch(request_id, token="revoked_a").status_code == 401


def test_a_receipt_fails_under_a_policy_trusting_another_root(rx: Receipts) -> None:
    body = _chat(VLLM, False)
    response, received = rx.send(f"/proxy/{rx.domain()}/v1/chat/completions", body)
    rx.verified(response, body, received)
    receipt = parse_receipt(rx.fetch(response.headers["x-request-id"]).content)
    # The session's other simulated platform (the TLS one): genuine sim evidence, but not this enclave's root.
    result = verify_receipt(receipt, request=body, response=received, policy=enclave_policy())
    assert not result.ok and result.error.startswith("signature_and_evidence: evidence of the signing key refused")


def test_signer_failure_is_a_503(rx: Receipts) -> None:
    response, _ = rx.send(f"/proxy/{rx.domain()}/v1/chat/completions", _chat(VLLM, False))
    ctx = rx.service.server.ctx
    kept = ctx.signer

    def broken():
        raise ProviderError("no evidence device")

    ctx.signer = SignerSource(broken)
    try:
        r = rx.fetch(response.headers["x-request-id"])
    finally:
        ctx.signer = kept
    assert r.status_code == 503 and r.json()["error"]["code"] == "signer_unavailable"
    assert "no evidence device" not in r.text


def test_the_database_down_is_a_503_not_a_500(rx: Receipts) -> None:
    """A written record cannot be read while the database is away: 503 receipt_unavailable (was a bare 500), and
    the receipt is there again once it is back."""
    from tests.enclave.usage_support import rename_table

    response, _ = rx.send(f"/proxy/{rx.domain()}/v1/chat/completions", _chat(VLLM, False))
    request_id = response.headers["x-request-id"]
    server = rx.service.server
    server.run_async(rx.ledger.flush())
    server.run_async(rename_table(server.ctx.store, "usage_records", "usage_away"))
    try:
        r = rx.fetch(request_id)
    finally:
        server.run_async(rename_table(server.ctx.store, "usage_away", "usage_records"))
    assert r.status_code == 503 and r.json()["error"]["code"] == "receipt_unavailable"
    assert rx.fetch(request_id).status_code == 200


def test_every_fetch_signs_the_same_statement(rx: Receipts) -> None:
    response, _ = rx.send(f"/proxy/{rx.domain()}/v1/chat/completions", _chat(VLLM, False))
    first, second = (parse_receipt(rx.fetch(response.headers["x-request-id"]).content) for _ in range(2))
    assert first.statement == second.statement and first.key_id == second.key_id
    assert first.key_id == rx.service.server.ctx.signer.get().identity.key_id


def test_a_written_record_signs_the_same_statement_and_a_host_edit_gets_no_receipt(rx: Receipts) -> None:
    """Once the ledger has written the record, the receipt comes from the database and signs the same statement.
    The host then rewrites the row's response hash to that of bytes the service never sent: the row fails its MAC,
    and the enclave signs nothing for it."""
    body = _chat(VLLM, False)
    response, received = rx.send(f"/proxy/{rx.domain()}/v1/chat/completions", body)
    request_id = response.headers["x-request-id"]
    from_memory = rx.verified(response, body, received)
    server = rx.service.server
    server.run_async(rx.ledger.flush())
    from_database = parse_receipt(rx.fetch(request_id).content)
    assert from_database.statement == from_memory

    async def forge() -> None:
        async with server.ctx.store.engine.begin() as conn:
            await conn.execute(sa.text("UPDATE usage_records SET response_sha256 = :h WHERE request_id = :id"),
                               {"h": hashlib.sha256(b"what the service never said").hexdigest(), "id": request_id})
    server.run_async(forge())
    forged = rx.fetch(request_id)
    assert forged.status_code == 404 and forged.json()["error"]["code"] == "receipt_not_found"


# ---- the attested openai client fetches receipts --------------------------------------------------------
def test_the_attested_openai_client_fetches_a_receipt(rx: Receipts) -> None:
    client = openai_client(f"{rx.service.server.url}/proxy/{rx.domain()}/v1", rx.world.tokens["member_a"],
                           enclave_policy(), max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model=VLLM, messages=[{"role": "user", "content": "hi"}])
    completion = raw.parse()
    receipt = client.receipt(completion._request_id)
    result = verify_receipt(receipt, request=raw.http_request.content, response=raw.http_response.content,
                            policy=rx.policy)
    assert result.ok, result.error
    with pytest.raises(openai.NotFoundError):
        client.receipt(uuid.uuid4().hex)
    with pytest.raises(ValueError):
        client.receipt("../admin")


def test_the_async_attested_openai_client_fetches_a_receipt(rx: Receipts) -> None:
    async def run() -> tuple[Any, Any]:
        client = async_openai_client(f"{rx.service.server.url}/proxy/{rx.domain()}/v1",
                                     rx.world.tokens["member_a"], enclave_policy(), max_retries=0)
        async with client:
            raw = await client.chat.completions.with_raw_response.create(
                model=VLLM, messages=[{"role": "user", "content": "hi"}], stream=True)
            stream = raw.parse()
            async for _ in stream:
                pass
            return raw, await client.receipt(raw.headers["x-request-id"])

    raw, receipt = asyncio.run(run())
    assert receipt.statement["stream"] is True and receipt.statement["request_id"] == raw.headers["x-request-id"]
    assert verify_receipt(receipt, request=raw.http_request.content, response=None, policy=rx.policy).error \
        .startswith("response_sha256: not given")


# ---- cube-attest verify-receipt on a receipt the enclave made --------------------------------------------------
def _cube_attest(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "import sys; from attestation.cli import main; sys.exit(main())",
                           "verify-receipt", *args], capture_output=True, text=True, timeout=120)


def test_cube_attest_verify_receipt_exit_codes(rx: Receipts, tmp_path: Path) -> None:
    body = b'{"model":"llama3.2:3b","messages":[{"role":"user","content":"hi"}]}'
    response, received = rx.send(f"/proxy/{rx.domain()}/api/chat", body)
    rx.verified(response, body, received)
    files = {name: tmp_path / name for name in ("receipt.json", "request.json", "response.ndjson", "policy.yaml")}
    files["receipt.json"].write_bytes(rx.fetch(response.headers["x-request-id"]).content)
    files["request.json"].write_bytes(body)
    files["response.ndjson"].write_bytes(received)
    sim = SimPlatform.load_or_create(rx.service.server.settings.data_dir / "sim")
    files["policy.yaml"].write_text(sim_policy_yaml(sim.fingerprint))
    args = [str(files["receipt.json"]), "--request", str(files["request.json"]), "--response",
            str(files["response.ndjson"]), "--policy", str(files["policy.yaml"]), "--json"]
    ok = _cube_attest(*args)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert json.loads(ok.stdout)["ok"] is True
    files["response.ndjson"].write_bytes(received[:-2] + bytes([received[-2] ^ 1]) + received[-1:])
    changed = _cube_attest(*args)
    assert changed.returncode == 1 and json.loads(changed.stdout)["error"].startswith("response_sha256")
    files["response.ndjson"].write_bytes(received)
    files["policy.yaml"].write_text(sim_policy_yaml(sim_provider().fingerprint))   # the TLS platform's root
    other = _cube_attest(*args)
    assert other.returncode == 1 and json.loads(other.stdout)["error"].startswith("signature_and_evidence")
    files["receipt.json"].write_text("{}")
    assert _cube_attest(*args).returncode == 2
