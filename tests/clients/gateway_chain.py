"""The whole chain the issue's "Done when" asks for, as module-scoped fixtures.

llama.cpp server (a ``vllm``-kind backend: it serves the OpenAI API) and a FakeOllama (an ``ollama``-kind
backend) behind the enclave (attested TLS in simulation, the test world seeded), and in front of it the real
``cube-attest proxy`` subprocess holding ``member_a``'s PAT in a 0600 file and the simulated platform's policy.
Clients that cannot embed the attested client reach the enclave only through that proxy.

Import the fixtures into the test module: ``from tests.clients.gateway_chain import chain, gateway  # noqa: F401``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from attestation.policy import sim_policy_yaml
from enclave.inference.record import InferenceRecord

from tests.atls.test_proxy_cli import Running, private_file
from tests.enclave.conftest import sim_provider
from tests.enclave.inference_support import Service, start_service
from tests.fakes.ollama import FakeOllama
from tests.llama.fixtures import LlamaServer

MEMBER = "member_a"       # the PAT the proxy holds (domain A, scopes models:read + models:infer)
DOMAIN = "A"
OLLAMA_MODEL = "llama3.2:3b"  # one of FakeOllama's default models


def start_proxy(upstream: str, policy_file: Path, pat_file: Path | None = None) -> Running:
    """The real ``cube-attest proxy`` on a free loopback port (read its ready line with ``Running.until``)."""
    args = ["--listen", "127.0.0.1:0", "--upstream", upstream, "--policy", str(policy_file)]
    if pat_file is not None:
        args += ["--pat-file", str(pat_file)]
    return Running(*args)


@dataclass(frozen=True)
class Chain:
    service: Service
    llama: LlamaServer
    startup: str              # everything the proxy printed up to its ready line
    token: str                # member_a's PAT (only the proxy and openai-python's attested client hold it)
    pat_id: str
    enclave_v1: str           # https://127.0.0.1:P/proxy/<domain>/v1, for the attested client
    proxy_domain: str         # http://127.0.0.1:Q/proxy/<domain>: Ollama-native clients, Continue's ollama provider
    proxy_v1: str             # the same + /v1: OpenAI-compatible clients

    def record_count(self) -> int:
        with self.service._lock:
            return len(self.service.records)

    def records_since(self, start: int) -> list[InferenceRecord]:
        with self.service._lock:
            return list(self.service.records[start:])


@pytest.fixture(scope="module")
def gateway(llama_server: LlamaServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """The enclave over the llama.cpp server (``llama``, vllm kind) and a FakeOllama (``ollama``)."""
    with FakeOllama() as ollama:
        backends = [({"name": "llama", "kind": "vllm"}, llama_server), ({"name": "ollama", "kind": "ollama"}, ollama)]
        with start_service(tmp_path_factory.mktemp("gateway-chain"), backends) as service:  # type: ignore[list-item]
            yield service


@pytest.fixture(scope="module")
def chain(gateway: Service, llama_server: LlamaServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chain]:
    """The gateway with the real ``cube-attest proxy`` in front, holding ``member_a``'s PAT."""
    scratch = tmp_path_factory.mktemp("gateway-proxy")
    policy_file = scratch / "sim-policy.yaml"
    policy_file.write_text(sim_policy_yaml(sim_provider().fingerprint))
    pat_file = private_file(scratch / "cube.pat", gateway.world.tokens[MEMBER] + "\n")
    running = start_proxy(gateway.server.url, policy_file, pat_file)
    try:
        lines = running.until("listening on http://127.0.0.1:")
        url = lines[-1].split("listening on ", 1)[1].split(" ", 1)[0]
        domain_id = gateway.world.domains[DOMAIN]
        yield Chain(gateway, llama_server, "".join(lines), token=gateway.world.tokens[MEMBER],
                    pat_id=gateway.world.pat_ids[MEMBER], enclave_v1=f"{gateway.server.url}/proxy/{domain_id}/v1",
                    proxy_domain=f"{url}/proxy/{domain_id}", proxy_v1=f"{url}/proxy/{domain_id}/v1")
    finally:
        running.stop()
