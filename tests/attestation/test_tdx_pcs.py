"""PcsClient against a fake Intel PCS on a real loopback socket, serving the real collateral files."""

from __future__ import annotations

import threading
import urllib.parse
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from attestation.errors import CollateralError, FetchError
from attestation.tdx import PcsClient, collateral_to_files, load_collateral_dir, verify_quote

from .test_tdx_helpers import COLLATERAL_DIR, TDX_DIR, when

SET = COLLATERAL_DIR / "pcs-2026-02"
FMSPC = "90c06f000000"
AT = when("2026-02-03T00:00:00Z")
V5_QUOTE = (TDX_DIR / "go-tdx-guest--quote_v5_sample.dat").read_bytes()


class FakePcs:
    """Intel PCS v4 stand-in: same paths, query parameters, bodies (real PCS files) and issuer-chain headers
    (URL-encoded PEM, exactly as stored from PCS responses). `fail_with` queues status codes to answer first."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.requests: list[str] = []
        self.fail_with: list[int] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                fake.requests.append(self.path)
                if fake.fail_with:
                    code = fake.fail_with.pop(0)
                    self.send_response(code)
                    if code == 429:
                        self.send_header("Retry-After", "0")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                found = fake.route(self.path)
                if found is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body, content_type, headers = found
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def route(self, path: str):
        url = urllib.parse.urlsplit(path)
        query = dict(urllib.parse.parse_qsl(url.query))
        d = self.directory

        def read(name: str) -> bytes | None:
            return (d / name).read_bytes() if (d / name).is_file() else None

        if url.path == "/tdx/certification/v4/tcb" and "fmspc" in query:
            body = read(f"tcb_info_{query['fmspc'].lower()}.json")
            chain = read(f"tcb_info_{query['fmspc'].lower()}_chain.txt")
            if body and chain:
                return body, "application/json", {"TCB-Info-Issuer-Chain": chain.decode().strip()}
        if url.path == "/tdx/certification/v4/qe/identity":
            return read("qe_identity.json"), "application/json", {
                "SGX-Enclave-Identity-Issuer-Chain": read("qe_identity_chain.txt").decode().strip()
            }
        if url.path == "/sgx/certification/v4/pckcrl" and query.get("encoding") == "der":
            ca = query.get("ca")
            body, chain = read(f"pck_crl_{ca}.crl"), read(f"pck_crl_{ca}_chain.txt")
            if body and chain:
                return body, "application/pkix-crl", {"SGX-PCK-CRL-Issuer-Chain": chain.decode().strip()}
        if url.path == "/sgx/certification/v4/rootcacrl":
            return read("root_ca.crl"), "application/pkix-crl", {}
        return None

    def __enter__(self) -> "FakePcs":
        self.thread.start()
        host, port = self.server.server_address[:2]
        self.url = f"http://{host}:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


class _NoNetwork(httpx.BaseTransport):
    def handle_request(self, request: httpx.Request) -> httpx.Response:
        raise AssertionError(f"unexpected network request {request.url}")


@pytest.fixture()
def pcs():
    with FakePcs(SET) as fake:
        yield fake


def test_fetch_matches_the_files_and_verifies(pcs: FakePcs, tmp_path: Path) -> None:
    client = PcsClient(base_url=pcs.url, cache_dir=tmp_path, clock=lambda: AT)
    collateral = client.collateral(FMSPC.upper())
    reference = collateral_to_files(load_collateral_dir(SET))
    fetched = collateral_to_files(collateral)
    assert set(fetched) == set(reference) - {"pck_crl_processor.crl", "pck_crl_processor_chain.txt"}
    for name, data in fetched.items():
        assert data.strip() == reference[name].strip(), name
    assert sorted(pcs.requests) == sorted(
        [
            f"/tdx/certification/v4/tcb?fmspc={FMSPC}",
            "/tdx/certification/v4/qe/identity",
            "/sgx/certification/v4/pckcrl?ca=platform&encoding=der",
            "/sgx/certification/v4/rootcacrl",
        ]
    )
    assert verify_quote(V5_QUOTE, collateral=collateral, at=AT).tcb_status == "UpToDate"
    # the cache directory is a valid collateral directory
    assert load_collateral_dir(tmp_path).fmspc == FMSPC
    client.close()


def test_cache_hit_without_network_until_next_update(pcs: FakePcs, tmp_path: Path) -> None:
    with PcsClient(base_url=pcs.url, cache_dir=tmp_path, clock=lambda: AT) as first:
        first.collateral(FMSPC)
    with PcsClient(base_url=pcs.url, cache_dir=tmp_path, clock=lambda: AT, transport=_NoNetwork()) as cached:
        assert cached.collateral(FMSPC).fmspc == FMSPC
        assert cached.network_fetches == 0
    # after the QE identity's nextUpdate the client refetches it (and only the stale files)
    later = when("2026-02-12T00:00:00Z")
    before = len(pcs.requests)
    with PcsClient(base_url=pcs.url, cache_dir=tmp_path, clock=lambda: later) as stale:
        stale.collateral(FMSPC)
    refetched = pcs.requests[before:]
    assert "/tdx/certification/v4/qe/identity" in refetched
    assert "/sgx/certification/v4/rootcacrl" not in refetched  # the root CA CRL is valid for a year


def test_verify_quote_fetches_through_pcs(pcs: FakePcs, tmp_path: Path) -> None:
    with PcsClient(base_url=pcs.url, cache_dir=tmp_path, clock=lambda: AT) as client:
        evidence = verify_quote(V5_QUOTE, pcs=client, at=AT)
    assert evidence.tcb_status == "UpToDate"
    assert evidence.claims["tdx_module_id"] == "TDX_01"


def test_offline_directory_and_offline_miss(tmp_path: Path) -> None:
    with PcsClient(offline_dir=SET, offline=True, transport=_NoNetwork()) as client:
        collateral = client.collateral(FMSPC)
        assert verify_quote(V5_QUOTE, collateral=collateral, at=AT).tcb_status == "UpToDate"
        with pytest.raises(CollateralError, match="offline"):
            client.collateral("00a06d080000")  # not in that directory
        with pytest.raises(CollateralError):
            client.collateral("not-an-fmspc")
    with PcsClient(cache_dir=tmp_path, offline=True, transport=_NoNetwork()) as empty:
        with pytest.raises(CollateralError, match="offline"):
            empty.collateral(FMSPC)


def test_rate_limits_and_outages_back_off_boundedly(pcs: FakePcs, tmp_path: Path) -> None:
    sleeps: list[float] = []
    pcs.fail_with = [429, 503]
    with PcsClient(base_url=pcs.url, clock=lambda: AT, sleep=sleeps.append, backoff=0.01, max_retries=3) as client:
        assert client.collateral(FMSPC).fmspc == FMSPC
    assert len(sleeps) == 2 and all(0 <= s <= 8 for s in sleeps)
    pcs.fail_with = [500] * 10
    sleeps.clear()
    with PcsClient(base_url=pcs.url, clock=lambda: AT, sleep=sleeps.append, backoff=0.01, max_retries=2) as client:
        with pytest.raises(FetchError, match="3 attempts"):
            client.collateral(FMSPC)
    assert len(sleeps) == 2
    pcs.fail_with = []
    with PcsClient(base_url=pcs.url, clock=lambda: AT, sleep=sleeps.append) as client:
        with pytest.raises(FetchError, match="404"):
            client.collateral("00a06d080000")


def test_unreachable_pcs_is_a_fetch_error(tmp_path: Path) -> None:
    with FakePcs(SET) as fake:
        url = fake.url
    with PcsClient(base_url=url, sleep=lambda s: None, max_retries=1, timeout=2) as client:
        with pytest.raises(FetchError):
            client.collateral(FMSPC)


def test_stale_cache_is_used_offline(pcs: FakePcs, tmp_path: Path) -> None:
    with PcsClient(base_url=pcs.url, cache_dir=tmp_path, clock=lambda: AT) as client:
        client.collateral(FMSPC)
    late = AT + timedelta(days=300)
    with PcsClient(cache_dir=tmp_path, offline=True, clock=lambda: late, transport=_NoNetwork()) as offline:
        collateral = offline.collateral(FMSPC)
    # handed out, but verification refuses it as expired
    from attestation.errors import VerificationError

    with pytest.raises(VerificationError):
        verify_quote(V5_QUOTE, collateral=collateral, at=late)
