"""KdsClient against a fake AMD KDS on a real loopback socket."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from cryptography.hazmat.primitives import serialization

from attestation.errors import CollateralError, FetchError, VerificationError
from attestation.snp import parse_report, verify_report
from attestation.snp.kds import KdsClient
from attestation.snp.tcb import decode_tcb
from tests.attestation.test_snp_forge import NOW, Platform, root, vector_inputs
from tests.conftest import VECTORS


class FakeKds:
    """A stand-in for https://kdsintf.amd.com (which cannot be reached from tests), faithful to its
    paths and encodings: ``/vcek/v1/{product}/cert_chain`` and ``/vlek/v1/{product}/cert_chain``
    answer PEM (AS(V)K then ARK), ``/vcek/v1/{product}/{hwid}?blSPL=..&teeSPL=..&snpSPL=..&ucodeSPL=..``
    (+``fmcSPL`` on Turin) answers the DER VCEK, ``/{vcek,vlek}/v1/{product}/crl`` a DER CRL. Unknown
    paths answer 404, as KDS does; ``script`` queues (status, headers) answers served before the real one."""

    def __init__(self) -> None:
        self.chains: dict[tuple[str, str], bytes] = {}
        self.vceks: dict[tuple[str, str, tuple[tuple[str, int], ...]], bytes] = {}
        self.crls: dict[tuple[str, str], bytes] = {}
        self.script: list[tuple[int, dict[str, str]]] = []
        self.requests: list[str] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                fake.requests.append(self.path)
                if fake.script:
                    status, headers = fake.script.pop(0)
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body, ctype = fake.answer(self.path)
                if body is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def answer(self, path: str) -> tuple[bytes | None, str]:
        parts = urlsplit(path)
        segs = parts.path.strip("/").split("/")
        if len(segs) != 4 or segs[0] not in ("vcek", "vlek") or segs[1] != "v1":
            return None, ""
        kind, product, leaf = segs[0], segs[2], segs[3]
        if leaf == "cert_chain":
            return self.chains.get((kind, product)), "application/x-pem-file"
        if leaf == "crl":
            return self.crls.get((kind, product)), "application/pkix-crl"
        query = parse_qs(parts.query)
        try:
            tcb = tuple(sorted((k, int(v[0])) for k, v in query.items()))
        except ValueError:
            return None, ""
        return self.vceks.get((product, leaf, tcb)), "application/x-x509-ca-cert"

    def start(self) -> str:
        self.thread.start()
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def kds(expected: dict) -> Iterator[FakeKds]:
    fake = FakeKds()
    fake.chains[("vcek", "Milan")] = root("milan_ask_ark.pem")
    fake.chains[("vlek", "Milan")] = root("milan_asvk_ark.pem")
    fake.chains[("vcek", "Turin")] = root("turin_ask_ark.pem")
    for v in expected["snp"]:
        if v["signing_key"] != "VCEK":
            continue
        report = parse_report(vector_inputs(v)[0])
        t = decode_tcb(report.reported_tcb, "Milan")
        tcb = tuple(sorted({"blSPL": t.bl, "teeSPL": t.tee, "snpSPL": t.snp, "ucodeSPL": t.ucode}.items()))
        fake.vceks[("Milan", report.chip_id.hex(), tcb)] = (VECTORS / v["vek"]).read_bytes()
    fake.start()
    yield fake
    fake.stop()


def _url(fake: FakeKds) -> str:
    host, port = fake.server.server_address[:2]
    return f"http://{host}:{port}"


def test_fetch_then_cache_hit_without_network(kds: FakeKds, expected: dict, tmp_path: Path) -> None:
    v = expected["snp"][0]
    report, _, _, at = vector_inputs(v)
    client = KdsClient(base_url=_url(kds), cache_dir=tmp_path)
    with pytest.raises(VerificationError, match="product"):  # v2 report, no VEK: product must be said
        verify_report(report, kds=client, at=at)
    ev = verify_report(report, kds=client, at=at, product="Milan")
    assert ev.claims["chip_id"] == v["chip_id"]
    assert len(kds.requests) == 2
    vcek_path = next(p for p in kds.requests if "SPL" in p)
    assert vcek_path.startswith(f"/vcek/v1/Milan/{v['chip_id']}?")
    assert "blSPL=3&teeSPL=0&snpSPL=8&ucodeSPL=115" in vcek_path
    client.close()
    # A new client with the same cache directory, offline: no request at all.
    offline = KdsClient(base_url=_url(kds), cache_dir=tmp_path, offline=True)
    before = len(kds.requests)
    verify_report(report, kds=offline, at=at, product="Milan-B0")
    assert len(kds.requests) == before
    # And a server that is gone does not matter for cached material either.
    kds.stop()
    online = KdsClient(base_url=_url(kds), cache_dir=tmp_path, max_attempts=1)
    assert len(online.cert_chain("Milan")) == 2


def test_offline_miss_is_a_clear_error(kds: FakeKds, tmp_path: Path) -> None:
    client = KdsClient(base_url=_url(kds), cache_dir=tmp_path, offline=True)
    with pytest.raises(CollateralError, match="offline"):
        client.cert_chain("Milan")
    assert kds.requests == []


def test_429_then_200_honours_retry_after(kds: FakeKds) -> None:
    sleeps: list[float] = []
    kds.script = [(429, {"Retry-After": "3"}), (503, {})]
    client = KdsClient(base_url=_url(kds), sleep=sleeps.append, backoff_base=0.25)
    assert len(client.cert_chain("Milan", vlek=True)) == 2
    assert kds.requests == ["/vlek/v1/Milan/cert_chain"] * 3
    assert sleeps == [3.0, 0.5]


def test_retries_are_bounded_and_4xx_not_retried(kds: FakeKds) -> None:
    sleeps: list[float] = []
    kds.script = [(429, {"Retry-After": "1000"})] * 5
    client = KdsClient(base_url=_url(kds), sleep=sleeps.append, max_attempts=3, backoff_max=5.0)
    with pytest.raises(FetchError, match="3 attempts"):
        client.cert_chain("Milan")
    assert sleeps == [5.0, 5.0] and len(kds.requests) == 3
    kds.script = [(400, {}), (200, {})]
    kds.requests.clear()
    with pytest.raises(FetchError, match="400"):
        client.cert_chain("Milan")
    assert len(kds.requests) == 1
    kds.script.clear()
    with pytest.raises(FetchError, match="404"):
        client.vcek("Milan", bytes(range(64)), 0x7308000000000003)


def test_unreachable_kds_is_fetch_error(tmp_path: Path) -> None:
    client = KdsClient(base_url="http://127.0.0.1:9", max_attempts=2, sleep=lambda s: None)
    with pytest.raises(FetchError):
        client.cert_chain("Milan")


def test_garbage_from_kds_is_not_cached(kds: FakeKds, tmp_path: Path) -> None:
    kds.chains[("vcek", "Genoa")] = b"<html>maintenance</html>"
    client = KdsClient(base_url=_url(kds), cache_dir=tmp_path)
    with pytest.raises(FetchError, match="unusable"):
        client.cert_chain("Genoa")
    assert not any(tmp_path.rglob("*cert_chain*"))


def test_turin_vcek_url_uses_8_byte_hwid_and_fmc() -> None:
    client = KdsClient()
    chip = bytes.fromhex("1e550a8ee5cf9f4d") + bytes(56)
    path = client.vcek_path("Turin", chip, decode_tcb(0x5100000004010101, "Turin"))
    assert path == "/vcek/v1/Turin/1e550a8ee5cf9f4d?fmcSPL=1&blSPL=1&teeSPL=1&snpSPL=4&ucodeSPL=81"
    with pytest.raises(CollateralError):
        client.vcek_path("Milan", bytes(64), 0x7308000000000003)


def test_crl_through_kds_refuses_revoked_ask(tmp_path: Path) -> None:
    p = Platform(tag="k")
    fake = FakeKds()
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in p.chain())
    fake.chains[("vcek", "Milan")] = pem
    fake.crls[("vcek", "Milan")] = p.crl([p.ask.serial_number]).public_bytes(serialization.Encoding.DER)
    fake.start()
    try:
        client = KdsClient(base_url=_url(fake), cache_dir=tmp_path,
                           clock=lambda: NOW)
        report = p.report()
        verify_report(report, vek=p.vek, kds=client, at=NOW, trust=p.trust)  # without CRL: fine
        with pytest.raises(VerificationError) as e:
            verify_report(report, vek=p.vek, kds=client, at=NOW, trust=p.trust, check_crl=True)
        assert e.value.checks[-1].name == "crl"
        assert "/vcek/v1/Milan/crl" in fake.requests
        assert client.crl("Milan").get_revoked_certificate_by_serial_number(p.ask.serial_number) is not None
    finally:
        fake.stop()


def test_vlek_chain_fetched_from_kds_vlek_path(kds: FakeKds, expected: dict) -> None:
    v = next(v for v in expected["snp"] if v["signing_key"] == "VLEK")
    report, vlek, _, at = vector_inputs(v)
    client = KdsClient(base_url=_url(kds))
    ev = verify_report(report, vek=vlek, kds=client, at=at)
    assert ev.claims["signing_key"] == "VLEK"
    assert kds.requests == ["/vlek/v1/Milan/cert_chain"]
    with pytest.raises(CollateralError, match="VLEK"):  # VLEKs are not on KDS
        verify_report(report, kds=client, at=at)


def test_crl_cache_honours_next_update(tmp_path: Path) -> None:
    from datetime import timedelta

    p = Platform(tag="k")
    fake = FakeKds()
    fake.crls[("vcek", "Milan")] = p.crl([], next_update=NOW + timedelta(days=1)).public_bytes(
        serialization.Encoding.DER)
    base = fake.start()
    try:
        clock = [NOW]
        client = KdsClient(base_url=base, cache_dir=tmp_path, clock=lambda: clock[0])
        client.crl("Milan")
        client.crl("Milan")
        assert fake.requests == ["/vcek/v1/Milan/crl"]  # fresh: served from cache
        clock[0] = NOW + timedelta(days=2)
        offline = KdsClient(base_url=base, cache_dir=tmp_path, offline=True, clock=lambda: clock[0])
        with pytest.raises(CollateralError, match="stale"):
            offline.crl("Milan")
        fake.crls[("vcek", "Milan")] = p.crl([], next_update=NOW + timedelta(days=30)).public_bytes(
            serialization.Encoding.DER)
        assert client.crl("Milan").next_update_utc == NOW + timedelta(days=30)  # stale: fetched again
        assert fake.requests == ["/vcek/v1/Milan/crl"] * 2
    finally:
        fake.stop()


def test_crl_without_next_update_is_neither_accepted_nor_cached(tmp_path: Path) -> None:
    """Such a CRL would be "fresh" forever: a mirror could pin a CRL from before a revocation."""
    p = Platform(tag="k")
    fake = FakeKds()
    fake.crls[("vcek", "Milan")] = p.crl_without_next_update().public_bytes(serialization.Encoding.DER)
    base = fake.start()
    try:
        client = KdsClient(base_url=base, cache_dir=tmp_path, max_attempts=1)
        with pytest.raises(FetchError, match="no nextUpdate"):
            client.crl("Milan")
        assert not any(tmp_path.rglob("crl"))
        # Planted in the disk cache (the host's disk), it is not served from there either.
        (tmp_path / "vcek/v1/Milan").mkdir(parents=True)
        (tmp_path / "vcek/v1/Milan/crl").write_bytes(fake.crls[("vcek", "Milan")])
        offline = KdsClient(base_url=base, cache_dir=tmp_path, offline=True)
        with pytest.raises(CollateralError, match="not cached"):
            offline.crl("Milan")
    finally:
        fake.stop()
