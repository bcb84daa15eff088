"""Fake AMD KDS / Intel PCS upstreams on real loopback sockets (the real services cannot be reached here).

Faithful to the wire format the collateral cache relies on: exact KDS / PCS v4 paths and query strings,
bodies as AMD and Intel serve them (PEM chains, DER certificates and CRLs, PCS JSON), and the issuer
chain of PCS objects in the same response headers (URL-encoded PEM). Every request is counted per
path, and answers can be delayed (single-flight tests) or switched off (outage tests).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response

from tests.fakes.server import LoopbackServer

TCB_CHAIN_HEADER = "TCB-Info-Issuer-Chain"
QE_CHAIN_HEADER = "SGX-Enclave-Identity-Issuer-Chain"
CRL_CHAIN_HEADER = "SGX-PCK-CRL-Issuer-Chain"


class FakeUpstream:
    """Serves fixed responses keyed by "path?query" exactly as requested."""

    def __init__(self, *, delay: float = 0.0) -> None:
        self.routes: dict[str, tuple[bytes, str, dict[str, str]]] = {}
        self.hits: Counter[str] = Counter()
        self.delay = delay
        self.status_override: int | None = None

        async def app(scope, receive, send) -> None:  # a plain ASGI 3 callable
            await self._handle(scope, receive, send)

        self.server = LoopbackServer(app, name="fake-upstream")

    def add(self, key: str, body: bytes, media_type: str = "application/octet-stream",
            headers: dict[str, str] | None = None) -> None:
        self.routes[key] = (body, media_type, headers or {})

    async def _handle(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        key = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        self.hits[key] += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.status_override is not None:
            response = Response(b"unavailable", status_code=self.status_override)
        elif key in self.routes:
            body, media_type, headers = self.routes[key]
            response = Response(body, media_type=media_type, headers=headers)
        else:
            response = Response(b"not found", status_code=404)
        await response(scope, receive, send)

    @property
    def total(self) -> int:
        return sum(self.hits.values())

    def start(self) -> str:
        return self.server.start()

    def stop(self) -> None:
        self.server.stop()


def add_pcs_set(fake: FakeUpstream, directory: Path) -> None:
    """Serve one Intel collateral directory (../shared/vectors/tdx/collateral/<set>) as PCS v4 does."""
    for tcb in directory.glob("tcb_info_*.json"):
        if tcb.name.endswith("_chain.txt"):
            continue
        fmspc = tcb.stem.removeprefix("tcb_info_")
        chain = (directory / f"tcb_info_{fmspc}_chain.txt").read_text().strip()
        fake.add(f"/tdx/certification/v4/tcb?fmspc={fmspc}", tcb.read_bytes(), "application/json",
                 {TCB_CHAIN_HEADER: chain})
    fake.add("/tdx/certification/v4/qe/identity", (directory / "qe_identity.json").read_bytes(), "application/json",
             {QE_CHAIN_HEADER: (directory / "qe_identity_chain.txt").read_text().strip()})
    for ca in ("platform", "processor"):
        crl = directory / f"pck_crl_{ca}.crl"
        if crl.exists():
            fake.add(f"/sgx/certification/v4/pckcrl?ca={ca}&encoding=der", crl.read_bytes(), "application/pkix-crl",
                     {CRL_CHAIN_HEADER: (directory / f"pck_crl_{ca}_chain.txt").read_text().strip()})
    fake.add("/IntelSGXRootCA.der", (directory / "root_ca.crl").read_bytes(), "application/pkix-crl")
