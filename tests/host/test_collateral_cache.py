"""Collateral cache: KDS/PCS mirror paths, nextUpdate, offline seeds, single-flight, and a lying host
caught by the verifier (everything served is AMD/Intel-signed)."""

from __future__ import annotations

import asyncio
import json
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fastapi.testclient import TestClient

from attestation.errors import VerificationError
from attestation.evidence import Evidence, encode_cmw
from attestation.snp.kds import KdsClient
from attestation.snp.verify import verify_report
from attestation.tdx.pcs import PcsClient
from attestation.tdx.verify import verify_quote
from host.verify_service import create_app
from tests.conftest import inside_validity, parse_when
from tests.fakes.server import LoopbackServer
from tests.host.conftest import pem_or_der_certs, snp_report_bytes
from tests.host.fake_upstreams import FakeUpstream, add_pcs_set
from tests.host.servers import free_port

V5_QUOTE = "tdx/go-tdx-guest--quote_v5_sample.dat"
V5_FMSPC = "90c06f000000"
V5_AT = parse_when("2026-02-03T00:00:00Z")
CBOR = {"content-type": "application/cmw+cbor", "accept": "application/json"}


def _dead_upstream() -> str:
    return f"http://127.0.0.1:{free_port()}"


def _agent(tmp_config, **collateral) -> LoopbackServer:
    config = tmp_config(collateral={"enabled": True, **collateral})
    server = LoopbackServer(create_app(config), name="agent")
    server.start()
    return server


def _snp_entry(expected: dict, report: str) -> dict:
    return next(e for e in expected["snp"] if e["report"] == report)


def _vcek_seed_name(entry: dict) -> str:
    """KDS seed file name for the VCEK of a Milan report (TCB bytes: bl, tee, 4 reserved, snp, ucode)."""
    tcb = int(entry["reported_tcb"], 16).to_bytes(8, "little")
    return f"{entry['chip_id']}-blSPL={tcb[0]}-teeSPL={tcb[1]}-snpSPL={tcb[6]}-ucodeSPL={tcb[7]}"


def _kds_seed(tmp_path: Path, vectors: Path, entry: dict, vcek_source: Path) -> Path:
    seed = tmp_path / "kds-seed"
    (seed / "vcek/v1/Milan").mkdir(parents=True)
    (seed / "vcek/v1/Milan/cert_chain").write_bytes((vectors / "roots/milan_ask_ark.pem").read_bytes())
    (seed / "vcek/v1/Milan" / _vcek_seed_name(entry)).write_bytes(pem_or_der_certs(vcek_source.read_bytes())[0])
    return seed


def _throwaway_crl(next_update: datetime) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(timezone.utc)
    crl = (x509.CertificateRevocationListBuilder()
           .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake ARK")]))
           .last_update(min(now, next_update) - timedelta(days=1)).next_update(next_update)
           .sign(key, hashes.SHA256()))
    return crl.public_bytes(serialization.Encoding.DER)


# --- Intel PCS -------------------------------------------------------------------------------------

def test_pcs_client_through_the_agent_verifies_and_survives_an_upstream_outage(tmp_config, vectors_dir) -> None:
    fake = FakeUpstream()
    add_pcs_set(fake, vectors_dir / "tdx/collateral/pcs-2026-02")
    upstream = fake.start()
    agent = _agent(tmp_config, pcs_upstream=upstream, intel_certs_upstream=upstream)
    quote = (vectors_dir / V5_QUOTE).read_bytes()
    try:
        with PcsClient(base_url=f"{agent.base_url}/pcs") as pcs:
            verified = verify_quote(quote, collateral=pcs.collateral(V5_FMSPC), at=V5_AT)
        assert verified.tcb_status == "UpToDate"
        assert fake.hits[f"/tdx/certification/v4/tcb?fmspc={V5_FMSPC}"] == 1
        assert fake.hits["/IntelSGXRootCA.der"] == 1
        r = httpx.get(f"{agent.base_url}/tdx/certification/v4/tcb", params={"fmspc": V5_FMSPC.upper()})
        assert r.headers["TCB-Info-Issuer-Chain"].startswith("-----BEGIN%20CERTIFICATE")
        assert json.loads(r.content)["tcbInfo"]["fmspc"] == V5_FMSPC
        # Upstream gone: the (stale, since nextUpdate has passed) disk copy is still served and still verifies.
        fake.stop()
        r = httpx.get(f"{agent.base_url}/pcs/tdx/certification/v4/qe/identity")
        assert r.status_code == 200 and r.headers["Cube-Cache"] == "stale"
        with PcsClient(base_url=agent.base_url) as pcs:
            assert verify_quote(quote, collateral=pcs.collateral(V5_FMSPC), at=V5_AT).tcb_status == "UpToDate"
        pem = httpx.get(f"{agent.base_url}/sgx/certification/v4/pckcrl", params={"ca": "platform"})
        assert pem.content.startswith(b"-----BEGIN X509 CRL-----")
        assert "SGX-PCK-CRL-Issuer-Chain" in pem.headers
    finally:
        agent.stop()
        fake.stop()
    # Someone edits the agent's disk cache (one TCB level's status); a restarted agent serves it
    # (upstream is still down), and the verifier refuses it.
    cached = Path(tmp_config().data_dir) / "collateral" / "pcs" / f"tcb_info_{V5_FMSPC}.json"
    original = cached.read_bytes()
    cached.write_bytes(original.replace(b'"tcbStatus":"OutOfDate"', b'"tcbStatus":"UpToDate"', 1))
    assert cached.read_bytes() != original
    agent = _agent(tmp_config, pcs_upstream=upstream, intel_certs_upstream=upstream)
    try:
        with PcsClient(base_url=agent.base_url, max_retries=0) as pcs:
            collateral = pcs.collateral(V5_FMSPC)
        with pytest.raises(VerificationError) as caught:
            verify_quote(quote, collateral=collateral, at=V5_AT)
        assert any(c.name == "tcb_info_signature" and not c.ok for c in caught.value.checks)
    finally:
        agent.stop()


def test_lying_host_with_tampered_tcb_info_is_caught(tmp_path, tmp_config, vectors_dir) -> None:
    seed = tmp_path / "pcs-seed"
    shutil.copytree(vectors_dir / "tdx/collateral/pcs-2026-02", seed)
    tcb_path = seed / f"tcb_info_{V5_FMSPC}.json"
    honest = tcb_path.read_bytes()
    quote = (vectors_dir / V5_QUOTE).read_bytes()
    agent = _agent(tmp_config, pcs_seed_dir=str(seed), offline=True, pcs_upstream=_dead_upstream())
    try:
        with PcsClient(base_url=agent.base_url) as pcs:  # control: the honest seed verifies
            assert verify_quote(quote, collateral=pcs.collateral(V5_FMSPC), at=V5_AT).tcb_status == "UpToDate"
    finally:
        agent.stop()
    # The host stretches nextUpdate by a year to pass off stale collateral as current.
    tcb_path.write_bytes(honest.replace(b'"nextUpdate":"2026-03-03', b'"nextUpdate":"2027-03-03', 1))
    assert tcb_path.read_bytes() != honest
    shutil.rmtree(tmp_path / "agent", ignore_errors=True)  # a fresh agent: no cached copy of the honest file
    agent = _agent(tmp_config, pcs_seed_dir=str(seed), offline=True, pcs_upstream=_dead_upstream())
    try:
        with PcsClient(base_url=agent.base_url) as pcs:
            collateral = pcs.collateral(V5_FMSPC)
        with pytest.raises(VerificationError) as caught:
            verify_quote(quote, collateral=collateral, at=V5_AT)
        assert any(c.name == "tcb_info_signature" and not c.ok for c in caught.value.checks)
    finally:
        agent.stop()


# --- AMD KDS -------------------------------------------------------------------------------------

def test_kds_client_through_the_agent_and_a_swapped_vcek_is_caught(tmp_path, tmp_config, vectors_dir, expected) -> None:
    entry = _snp_entry(expected, "snp/trustee--test-report.bin")
    report = snp_report_bytes(vectors_dir, entry)
    at = inside_validity(entry["vek_not_before"])
    honest_seed = _kds_seed(tmp_path / "honest", vectors_dir, entry, vectors_dir / entry["vek"])
    agent = _agent(tmp_config, kds_seed_dir=str(honest_seed), offline=True, kds_upstream=_dead_upstream())
    try:
        with KdsClient(base_url=f"{agent.base_url}/kds") as kds:
            verified = verify_report(report, product="Milan", at=at, kds=kds)
        assert verified.claims["measurement"] == entry["measurement"]
    finally:
        agent.stop()
    # The lying host answers with a genuine AMD VCEK of another chip.
    other = _snp_entry(expected, "snp/virtee-sev--report_milan.hex")
    lying_seed = _kds_seed(tmp_path / "lying", vectors_dir, entry, vectors_dir / other["vek"])
    shutil.rmtree(tmp_path / "agent", ignore_errors=True)
    agent = _agent(tmp_config, kds_seed_dir=str(lying_seed), offline=True, kds_upstream=_dead_upstream())
    try:
        with KdsClient(base_url=f"{agent.base_url}/kds") as kds:
            with pytest.raises(VerificationError):
                verify_report(report, product="Milan", at=at, kds=kds)
    finally:
        agent.stop()


def test_fresh_entries_are_served_from_cache_and_expired_ones_refetched(tmp_config) -> None:
    fake = FakeUpstream()
    fresh = _throwaway_crl(datetime.now(timezone.utc) + timedelta(days=1))
    expired = _throwaway_crl(datetime.now(timezone.utc) - timedelta(hours=1))
    fake.add("/vcek/v1/Genoa/crl", fresh, "application/pkix-crl")
    fake.add("/vcek/v1/Turin/crl", expired, "application/pkix-crl")
    agent = _agent(tmp_config, kds_upstream=fake.start())
    try:
        for _ in range(3):
            r = httpx.get(f"{agent.base_url}/vcek/v1/Genoa/crl")
            assert r.status_code == 200 and r.content == fresh
            r = httpx.get(f"{agent.base_url}/kds/vcek/v1/Turin/crl")
            assert r.status_code == 200 and r.content == expired
        assert fake.hits["/vcek/v1/Genoa/crl"] == 1     # honoured nextUpdate: one fetch
        assert fake.hits["/vcek/v1/Turin/crl"] == 3     # past nextUpdate: refetched every time
        assert (Path(tmp_config().data_dir) / "collateral/kds/vcek/v1/Genoa/crl").read_bytes() == fresh
    finally:
        agent.stop()
        fake.stop()


def test_single_flight_concurrent_misses_make_one_upstream_request(tmp_config, vectors_dir) -> None:
    fake = FakeUpstream(delay=0.4)
    chain = (vectors_dir / "roots/genoa_ask_ark.pem").read_bytes()
    fake.add("/vcek/v1/Genoa/cert_chain", chain, "application/x-pem-file")
    agent = _agent(tmp_config, kds_upstream=fake.start())

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=agent.base_url, timeout=10) as client:
            return await asyncio.gather(*[client.get("/vcek/v1/Genoa/cert_chain") for _ in range(12)])

    try:
        responses = asyncio.run(burst())
        assert all(r.status_code == 200 and r.content == chain for r in responses)
        assert fake.hits["/vcek/v1/Genoa/cert_chain"] == 1
    finally:
        agent.stop()
        fake.stop()


def test_collateral_errors_use_the_envelope(tmp_config, vectors_dir) -> None:
    fake = FakeUpstream()
    upstream = fake.start()
    agent = _agent(tmp_config, kds_upstream=upstream, pcs_upstream=upstream)
    try:
        def err(path: str, **params) -> tuple[int, str]:
            r = httpx.get(agent.base_url + path, params=params)
            return r.status_code, r.json()["error"]["code"]

        assert err("/tdx/certification/v4/tcb", fmspc="xyz") == (400, "invalid_fmspc")
        assert err("/sgx/certification/v4/pckcrl", ca="other") == (400, "invalid_ca")
        assert err("/vcek/v1/Milan/abcd") == (400, "invalid_hwid")
        assert err("/vcek/v1/Milan/" + "ab" * 64, blSPL="1") == (400, "invalid_query")
        assert err("/vcek/v1/Mil4n/cert_chain") == (400, "invalid_product")
        assert err("/tdx/certification/v4/qe/identity") == (404, "upstream_not_found")
        fake.status_override = 503
        assert err("/vlek/v1/Milan/cert_chain") == (502, "upstream_error")
        fake.stop()
        assert err("/vlek/v1/Genoa/crl") == (502, "upstream_unreachable")
    finally:
        agent.stop()
        fake.stop()
    offline = _agent(tmp_config, offline=True)
    try:
        r = httpx.get(offline.base_url + "/vcek/v1/Milan/cert_chain")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_cached"
    finally:
        offline.stop()


# --- the verification service fetching through its own cache, offline ---------------------------------

def test_verify_service_offline_with_seeds_only(tmp_path, tmp_config, vectors_dir, expected) -> None:
    """No network at all (upstreams point at closed ports): evidence without certificates or collateral
    still verifies from the seed directories; tampered seeds are refused."""
    entry = _snp_entry(expected, "snp/trustee--test-report.bin")
    kds_seed = _kds_seed(tmp_path / "k", vectors_dir, entry, vectors_dir / entry["vek"])
    pcs_seed = tmp_path / "pcs-seed"
    shutil.copytree(vectors_dir / "tdx/collateral/pcs-2026-02", pcs_seed)
    config = tmp_config(verify={"fetch_collateral": True},
                        collateral={"enabled": True, "offline": True, "kds_seed_dir": str(kds_seed),
                                    "pcs_seed_dir": str(pcs_seed), "kds_upstream": _dead_upstream(),
                                    "pcs_upstream": _dead_upstream(), "intel_certs_upstream": _dead_upstream()})
    snp = Evidence(platform="snp", report=snp_report_bytes(vectors_dir, entry), product="Milan")
    tdx = Evidence(platform="tdx", report=(vectors_dir / V5_QUOTE).read_bytes())
    snp_at = inside_validity(entry["vek_not_before"]).isoformat()
    with TestClient(create_app(config), raise_server_exceptions=False) as c:
        r = c.post("/v1/verify", params={"at": snp_at}, content=encode_cmw(snp), headers=CBOR)
        assert r.json()["status"] == "warning", r.json()  # accepted; default policy unmeasured
        r = c.post("/v1/verify", params={"at": V5_AT.isoformat()}, content=encode_cmw(tdx), headers=CBOR)
        assert r.json()["status"] == "warning", r.json()  # accepted; default policy unmeasured
    # Tamper with the seeds: one byte of the QE identity, and a VCEK of another chip.
    qe = pcs_seed / "qe_identity.json"
    qe.write_bytes(qe.read_bytes().replace(b'"isvprodid":2', b'"isvprodid":3', 1))
    other = _snp_entry(expected, "snp/virtee-sev--report_milan.hex")
    (kds_seed / "vcek/v1/Milan" / _vcek_seed_name(entry)).write_bytes(
        pem_or_der_certs((vectors_dir / other["vek"]).read_bytes())[0])
    shutil.rmtree(config.data_dir / "collateral", ignore_errors=True)
    with TestClient(create_app(config), raise_server_exceptions=False) as c:
        r = c.post("/v1/verify", params={"at": V5_AT.isoformat()}, content=encode_cmw(tdx), headers=CBOR)
        assert r.json()["status"] == "contraindicated", r.json()
        r = c.post("/v1/verify", params={"at": snp_at}, content=encode_cmw(snp), headers=CBOR)
        assert r.json()["status"] == "contraindicated", r.json()


def test_verify_service_fetches_missing_vcek_once_through_its_cache(tmp_config, vectors_dir, expected) -> None:
    entry = _snp_entry(expected, "snp/trustee--test-report.bin")
    tcb = int(entry["reported_tcb"], 16).to_bytes(8, "little")
    vcek_path = (f"/vcek/v1/Milan/{entry['chip_id']}?blSPL={tcb[0]}&teeSPL={tcb[1]}&snpSPL={tcb[6]}"
                 f"&ucodeSPL={tcb[7]}")
    fake = FakeUpstream()
    fake.add("/vcek/v1/Milan/cert_chain", (vectors_dir / "roots/milan_ask_ark.pem").read_bytes(), "application/x-pem-file")
    fake.add(vcek_path, pem_or_der_certs((vectors_dir / entry["vek"]).read_bytes())[0], "application/x-x509-ca-cert")
    config = tmp_config(verify={"fetch_collateral": True}, collateral={"enabled": True, "kds_upstream": fake.start()})
    evidence = encode_cmw(Evidence(platform="snp", report=snp_report_bytes(vectors_dir, entry), product="Milan"))
    at = inside_validity(entry["vek_not_before"]).isoformat()
    try:
        with TestClient(create_app(config), raise_server_exceptions=False) as c:
            for _ in range(3):
                r = c.post("/v1/verify", params={"at": at}, content=evidence, headers=CBOR)
                assert r.json()["status"] == "warning", r.json()  # accepted; default policy unmeasured
            assert fake.hits[vcek_path] == 1 and fake.hits["/vcek/v1/Milan/cert_chain"] == 1
            fake.stop()  # upstream gone and nothing cached for this chip: refused promptly, not hung
            other = _snp_entry(expected, "snp/virtee-sev--report_milan.hex")
            r = c.post("/v1/verify", params={"at": at}, headers=CBOR, content=encode_cmw(
                Evidence(platform="snp", report=snp_report_bytes(vectors_dir, other), product="Milan")))
            assert r.status_code == 200 and r.json()["status"] == "contraindicated"
            assert r.json()["verdict"] == "collateral_unavailable"
    finally:
        fake.stop()


async def test_upstream_fetch_is_one_capped_attempt(tmp_path: Path) -> None:
    """The cache does not retry (its verifier clients do) and stops reading an oversized answer."""
    from host.collateral_cache import MAX_UPSTREAM_BYTES, CollateralCache, CollateralCacheConfig, CollateralRequestError

    answers = [httpx.Response(503, headers={"Retry-After": "0"}),
               httpx.Response(200, content=b"-" * (MAX_UPSTREAM_BYTES + 1))]
    seen: list[str] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        return answers.pop(0)

    cache = CollateralCache(CollateralCacheConfig(cache_dir=tmp_path, kds_upstream="http://127.0.0.1:9"),
                            transport=httpx.MockTransport(upstream))
    try:
        with pytest.raises(CollateralRequestError) as caught:
            await cache.get(cache.kds_cert_chain("Milan"))
        assert (caught.value.status, caught.value.code, str(caught.value)) == (
            502, "upstream_error", "upstream kds answered 503")
        with pytest.raises(CollateralRequestError, match="answer too large") as caught:
            await cache.get(cache.kds_crl("Milan"))
        assert caught.value.status == 502
        assert seen == ["/vcek/v1/Milan/cert_chain", "/vcek/v1/Milan/crl"] and cache.upstream_fetches == 2
        assert not any(tmp_path.rglob("*"))  # nothing cached
    finally:
        await cache.aclose()


def _verify_snp_with_chip(c: TestClient, report: bytes, chip: bytes, at: str) -> httpx.Response:
    """POST /v1/verify for SNP evidence without certificates whose report names ``chip`` (0x1A0..0x1E0):
    the verifier must fetch that chip's VCEK before it can even check the signature."""
    forged = report[:0x1A0] + chip + report[0x1E0:]
    return c.post("/v1/verify", params={"at": at}, headers=CBOR,
                  content=encode_cmw(Evidence(platform="snp", report=forged, product="Milan")))


def _vcek_fetches(fake: FakeUpstream) -> int:
    return sum(n for path, n in fake.hits.items() if path.startswith("/vcek/v1/Milan/") and "cert_chain" not in path)


def test_unauthenticated_verify_requests_cannot_multiply_upstream_fetches(tmp_config, vectors_dir, expected) -> None:
    """20 requests used to make 20 AMD KDS fetches: a failure is now remembered, and the fetches one client
    (and all clients together) can cause are budgeted."""
    entry = _snp_entry(expected, "snp/trustee--test-report.bin")
    report = snp_report_bytes(vectors_dir, entry)
    at = inside_validity(entry["vek_not_before"]).isoformat()
    fake = FakeUpstream()  # knows no VCEK: every chip is unknown (404)
    fake.add("/vcek/v1/Milan/cert_chain", (vectors_dir / "roots/milan_ask_ark.pem").read_bytes(), "application/x-pem-file")
    config = tmp_config(verify={"fetch_collateral": True}, collateral={
        "enabled": True, "kds_upstream": fake.start(), "upstream_per_client_burst": 3,
        "upstream_per_client_per_minute": 0.001, "upstream_burst": 5, "upstream_per_minute": 0.001})
    try:
        app = create_app(config)
        with TestClient(app, client=("192.0.2.1", 40000), raise_server_exceptions=False) as c:
            for _ in range(20):  # the same unknown chip: one fetch, then the remembered 404
                r = _verify_snp_with_chip(c, report, b"\x11" * 64, at)
                assert r.status_code == 200 and r.json()["status"] == "contraindicated", r.text
            assert _vcek_fetches(fake) == 1
            for i in range(20):  # a new made-up chip each time: bounded by the client's budget
                r = _verify_snp_with_chip(c, report, bytes([i + 1]) + b"\x22" * 63, at)
                assert r.status_code == 200 and r.json()["status"] == "contraindicated", r.text
            assert _vcek_fetches(fake) == 3
        for n in range(3):  # other clients have their own budgets, and all of them share the overall one
            with TestClient(app, client=(f"198.51.100.{n + 1}", 40000), raise_server_exceptions=False) as c:
                for i in range(5):
                    assert _verify_snp_with_chip(c, report, bytes([n + 100, i]) + b"\x33" * 62, at).status_code == 200
        assert _vcek_fetches(fake) == 5
    finally:
        fake.stop()


def test_collateral_routes_answer_429_over_budget_and_remember_failures(tmp_config) -> None:
    fake = FakeUpstream()
    agent = _agent(tmp_config, kds_upstream=fake.start(), upstream_per_client_burst=2,
                   upstream_per_client_per_minute=0.001)
    try:
        with httpx.Client(base_url=agent.base_url) as c:
            for _ in range(3):  # one upstream 404, then remembered
                assert c.get("/kds/vcek/v1/Milan/crl").status_code == 404
            assert fake.hits["/vcek/v1/Milan/crl"] == 1
            assert c.get("/kds/vlek/v1/Milan/crl").status_code == 404  # the second (last) fetch of the budget
            over = c.get("/kds/vcek/v1/Genoa/crl")
            assert over.status_code == 429 and over.json()["error"]["code"] == "upstream_budget_exhausted"
            assert fake.total == 2
    finally:
        agent.stop()
        fake.stop()
