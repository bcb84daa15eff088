"""Collateral cache: AMD KDS and Intel PCS mirrored by the host agent, on disk, single-flight.

Enclaves and clients without internet reach AMD/Intel collateral through the host. Nothing here is
trusted: every object served is signed by AMD or Intel (VCEK/VLEK/ASK/ARK certificates and CRLs, TCB
info, QE identity, PCK CRLs), and the verifier checks those signatures against pinned roots, so a
host that lies (a swapped VCEK, a tampered TCB info) is caught by the verifier, not by this cache.

Served paths (by ``cube-host serve``, on the same listener as the verification API; each set both at
the root, so the agent can stand in for the upstream host as-is, and under a prefix):

AMD KDS (also under ``/kds``)::

    GET /vcek/v1/{product}/cert_chain          PEM: ASK then ARK
    GET /vcek/v1/{product}/crl                 DER CRL
    GET /vcek/v1/{product}/{hwid}?blSPL=..&teeSPL=..&snpSPL=..&ucodeSPL=..[&fmcSPL=..]   DER VCEK
    GET /vlek/v1/{product}/cert_chain          PEM: ASVK then ARK
    GET /vlek/v1/{product}/crl                 DER CRL

Intel PCS v4 (also under ``/pcs``), with the issuer chain in the same response headers as PCS::

    GET /tdx/certification/v4/tcb?fmspc=..           TCB-Info-Issuer-Chain
    GET /tdx/certification/v4/qe/identity            SGX-Enclave-Identity-Issuer-Chain
    GET /sgx/certification/v4/pckcrl?ca=platform|processor[&encoding=der]   SGX-PCK-CRL-Issuer-Chain
    GET /IntelSGXRootCA.der  and  /sgx/certification/v4/rootcacrl        Intel SGX Root CA CRL (DER)

Freshness: CRLs until their nextUpdate, TCB info and QE identity until their ``nextUpdate``; KDS
certificate chains and VCEKs for a configured TTL. A stale entry is refreshed from upstream; if
upstream fails, the stale copy is served (header ``Cube-Cache: stale``): the verifier, not the cache,
decides whether collateral is too old for its verification time.

Upstream protection (anyone who reaches the agent can make it fetch, e.g. ``POST /v1/verify`` with
SNP evidence naming a made-up chip): a failed fetch is remembered for ``negative_ttl`` seconds (the
same miss is answered from that memory, not upstream), and fetches that do go upstream are bounded
by a token bucket per client address (an IPv6 /64 counts as one) and one overall; over budget, a miss
is answered 429 ``upstream_budget_exhausted`` (a stale copy, when there is one, is served instead).
The verification service attributes the fetches its verifier makes to the caller of ``/v1/verify``.

Offline seed directories: the PCS seed holds the file names of an Intel collateral set
(``tcb_info_<fmspc>.json``, ``tcb_info_<fmspc>_chain.txt``, ``qe_identity.json``,
``qe_identity_chain.txt``, ``pck_crl_{platform,processor}.crl`` (+ ``_chain.txt``), ``root_ca.crl``);
the KDS seed mirrors the URL paths (``vcek/v1/Milan/cert_chain``, ``vcek/v1/Milan/crl``,
``vcek/v1/Milan/<hwid>-blSPL=3-teeSPL=0-snpSPL=8-ucodeSPL=115``). The disk cache uses the same layout
(``<cache>/pcs/...``, ``<cache>/kds/...``), so a filled cache directory is a valid seed directory.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import re
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Awaitable, Callable
from urllib.parse import urlencode

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from attestation.errors import FetchError
from attestation.fetch import afetch_with_backoff, atomic_write
from attestation.ratelimit import TokenBucket, client_key
from attestation.snp.kds import DEFAULT_KDS_URL
from attestation.tdx.pcs import (INTEL_CERTS_URL, INTEL_PCS_URL, PCK_CRL_CHAIN_HEADER, PCK_CRL_PATH, QE_CHAIN_HEADER,
                                 QE_IDENTITY_PATH, TCB_CHAIN_HEADER, TCB_PATH)

from .metrics import COLLATERAL_REQUESTS, COLLATERAL_UPSTREAM_FETCHES

log = logging.getLogger("cube.host.collateral")

_LEGACY_TCB_CHAIN_HEADER = "SGX-TCB-Info-Issuer-Chain"
MAX_UPSTREAM_BYTES = 4 * 1024 * 1024

_PRODUCT = re.compile(r"[A-Za-z]{1,16}")
_HWID = re.compile(r"[0-9a-fA-F]{16,128}")
_FMSPC = re.compile(r"[0-9a-fA-F]{12}")
_SPL_NAMES = ("blSPL", "teeSPL", "snpSPL", "ucodeSPL", "fmcSPL")
_MAX_REMEMBERED_FAILURES = 4096

# Whose request an upstream fetch is made for (a client key, see attestation.ratelimit.client_key). Set per
# request from the peer address, or by the verification service for the fetches of its verifier; never from
# anything a client sends.
FETCH_CLIENT: contextvars.ContextVar[str | None] = contextvars.ContextVar("cube_host_fetch_client", default=None)


class CollateralRequestError(Exception):
    """A request the cache cannot serve; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass
class CollateralCacheConfig:
    cache_dir: Path
    kds_upstream: str = DEFAULT_KDS_URL
    pcs_upstream: str = INTEL_PCS_URL
    intel_certs_upstream: str = INTEL_CERTS_URL
    kds_seed_dir: Path | None = None
    pcs_seed_dir: Path | None = None
    offline: bool = False
    fetch_timeout: float = 15.0
    kds_chain_ttl: float = 24 * 3600.0
    vcek_ttl: float = 30 * 24 * 3600.0
    default_ttl: float = 24 * 3600.0   # for PCS objects whose nextUpdate cannot be read
    negative_ttl: float = 30.0         # a failed upstream fetch is not retried for this long
    upstream_per_client_per_minute: float = 6.0
    upstream_per_client_burst: int = 10
    upstream_per_minute: float = 60.0
    upstream_burst: int = 60


@dataclass(frozen=True)
class Resource:
    """One cacheable upstream object."""

    service: str                  # "kds" | "pcs"
    name: str                     # file name relative to the service's cache/seed directory
    url: str                      # absolute upstream URL
    media_type: str
    chain_header: str | None = None
    kind: str = "blob"            # "tcb_info" | "qe_identity" | "crl" | "pem_chain" | "der_cert"
    ttl: float | None = None      # used when the object carries no nextUpdate


@dataclass
class Entry:
    body: bytes
    chain: str | None
    expires_at: float
    source: str = "cache"

    def fresh(self, now: float) -> bool:
        return now < self.expires_at


@dataclass
class Served:
    """What the HTTP layer sends back."""

    body: bytes
    media_type: str
    headers: dict[str, str] = field(default_factory=dict)


def _next_update(resource: Resource, body: bytes, default_ttl: float, now: float) -> float:
    """Expiry (epoch seconds) read from the object itself; raises ValueError if the body is unusable."""
    if resource.kind in ("tcb_info", "qe_identity"):
        doc = json.loads(body)
        inner = doc["tcbInfo"] if resource.kind == "tcb_info" else doc["enclaveIdentity"]
        text = inner["nextUpdate"]
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    if resource.kind == "crl":
        crl = x509.load_der_x509_crl(body)
        nxt = crl.next_update_utc
        return nxt.timestamp() if nxt is not None else now + default_ttl
    if resource.kind == "pem_chain":
        certs = x509.load_pem_x509_certificates(body)
        if not certs:
            raise ValueError("no certificate")
        return now + (resource.ttl or default_ttl)
    if resource.kind == "der_cert":
        with warnings.catch_warnings():  # some real VCEKs carry a non-positive serial (cryptography warns)
            warnings.simplefilter("ignore")
            x509.load_der_x509_certificate(body)
        return now + (resource.ttl or default_ttl)
    return now + (resource.ttl or default_ttl)


def _chain_name(name: str) -> str:
    stem, dot, ext = name.rpartition(".")
    return f"{stem}_chain.txt" if dot else f"{name}_chain.txt"


class CollateralCache:
    """Disk-backed, single-flight cache in front of AMD KDS and Intel PCS (async; one event loop)."""

    def __init__(self, config: CollateralCacheConfig, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.config = config
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._memory: dict[tuple[str, str], Entry] = {}
        self._inflight: dict[tuple[str, str], asyncio.Future[Entry]] = {}
        self._failures: dict[tuple[str, str], tuple[float, CollateralRequestError]] = {}
        self._per_client = TokenBucket(config.upstream_per_client_per_minute / 60, config.upstream_per_client_burst)
        self._overall = TokenBucket(config.upstream_per_minute / 60, config.upstream_burst)
        self.upstream_fetches = 0

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.config.fetch_timeout, transport=self._transport,
                                             follow_redirects=True)
        return self._client

    # ---- resources -----------------------------------------------------------------------------
    def kds_cert_chain(self, product: str, *, vlek: bool = False) -> Resource:
        product = self._product(product)
        kind = "vlek" if vlek else "vcek"
        return Resource("kds", f"{kind}/v1/{product}/cert_chain",
                        f"{self.config.kds_upstream.rstrip('/')}/{kind}/v1/{product}/cert_chain",
                        "application/x-pem-file", kind="pem_chain", ttl=self.config.kds_chain_ttl)

    def kds_crl(self, product: str, *, vlek: bool = False) -> Resource:
        product = self._product(product)
        kind = "vlek" if vlek else "vcek"
        return Resource("kds", f"{kind}/v1/{product}/crl",
                        f"{self.config.kds_upstream.rstrip('/')}/{kind}/v1/{product}/crl",
                        "application/pkix-crl", kind="crl")

    def kds_vcek(self, product: str, hwid: str, query: dict[str, str]) -> Resource:
        product = self._product(product)
        if not _HWID.fullmatch(hwid):
            raise CollateralRequestError(400, "hwid: must be 16 to 128 hex digits", "invalid_hwid")
        unknown = set(query) - set(_SPL_NAMES)
        if unknown:
            raise CollateralRequestError(400, f"unknown query parameter {sorted(unknown)[0]!r}", "invalid_query")
        spl: list[tuple[str, int]] = []
        for name in _SPL_NAMES:
            if name not in query:
                if name == "fmcSPL":
                    continue
                raise CollateralRequestError(400, f"{name}: required", "invalid_query")
            value = query[name]
            if not value.isdigit() or int(value) > 255:
                raise CollateralRequestError(400, f"{name}: must be an integer 0..255", "invalid_query")
            spl.append((name, int(value)))
        hwid = hwid.lower()
        suffix = "-".join(f"{k}={v}" for k, v in spl)
        return Resource("kds", f"vcek/v1/{product}/{hwid}-{suffix}",
                        f"{self.config.kds_upstream.rstrip('/')}/vcek/v1/{product}/{hwid}?{urlencode(spl)}",
                        "application/x-x509-ca-cert", kind="der_cert", ttl=self.config.vcek_ttl)

    def pcs_tcb_info(self, fmspc: str) -> Resource:
        if not _FMSPC.fullmatch(fmspc or ""):
            raise CollateralRequestError(400, "fmspc: must be 12 hex digits", "invalid_fmspc")
        fmspc = fmspc.lower()
        return Resource("pcs", f"tcb_info_{fmspc}.json",
                        f"{self.config.pcs_upstream.rstrip('/')}{TCB_PATH}?fmspc={fmspc}",
                        "application/json", chain_header=TCB_CHAIN_HEADER, kind="tcb_info")

    def pcs_qe_identity(self) -> Resource:
        return Resource("pcs", "qe_identity.json",
                        f"{self.config.pcs_upstream.rstrip('/')}{QE_IDENTITY_PATH}",
                        "application/json", chain_header=QE_CHAIN_HEADER, kind="qe_identity")

    def pcs_pck_crl(self, ca: str) -> Resource:
        if ca not in ("platform", "processor"):
            raise CollateralRequestError(400, "ca: must be platform or processor", "invalid_ca")
        return Resource("pcs", f"pck_crl_{ca}.crl",
                        f"{self.config.pcs_upstream.rstrip('/')}{PCK_CRL_PATH}?ca={ca}&encoding=der",
                        "application/pkix-crl", chain_header=PCK_CRL_CHAIN_HEADER, kind="crl")

    def pcs_root_ca_crl(self) -> Resource:
        return Resource("pcs", "root_ca.crl", f"{self.config.intel_certs_upstream.rstrip('/')}/IntelSGXRootCA.der",
                        "application/pkix-crl", kind="crl")

    @staticmethod
    def _product(product: str) -> str:
        if not _PRODUCT.fullmatch(product or ""):
            raise CollateralRequestError(400, "product: must be an AMD product name such as Milan, Genoa or Turin",
                                         "invalid_product")
        return product

    # ---- storage ------------------------------------------------------------------------------
    def _cache_path(self, r: Resource) -> Path:
        return self.config.cache_dir / r.service / r.name

    def _seed_dir(self, r: Resource) -> Path | None:
        return self.config.kds_seed_dir if r.service == "kds" else self.config.pcs_seed_dir

    def _load(self, directory: Path, r: Resource, source: str) -> Entry | None:
        path = directory / r.name
        try:
            body = path.read_bytes()
        except OSError:
            return None
        chain = None
        if r.chain_header:
            try:
                chain = (directory / _chain_name(r.name)).read_text().strip()
            except OSError:
                return None  # an object without its issuer chain is not servable
        try:
            expires = _next_update(r, body, self.config.default_ttl, path.stat().st_mtime)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("collateral %s/%s in %s is unreadable (%s); ignored", r.service, r.name, source, exc)
            return None
        return Entry(body, chain, expires, source)

    def _store(self, r: Resource, entry: Entry) -> None:
        path = self._cache_path(r)
        if r.chain_header and entry.chain is not None:
            atomic_write(path.parent / _chain_name(path.name), entry.chain.encode())
        atomic_write(path, entry.body)

    # ---- lookup --------------------------------------------------------------------------------
    async def get(self, r: Resource) -> Entry:
        """The freshest usable copy: fresh cache/seed, else upstream (single-flight), else stale."""
        key = (r.service, r.name)
        now = time.time()
        entry = self._memory.get(key)
        if entry is None:
            entry = self._load(self.config.cache_dir / r.service, r, "cache")
            seed_dir = self._seed_dir(r)
            if seed_dir is not None:
                seed = self._load(seed_dir, r, "seed")
                if seed is not None and (entry is None or seed.expires_at > entry.expires_at):
                    entry = seed
            if entry is not None:
                self._memory[key] = entry
        if entry is not None and (entry.fresh(now) or self.config.offline):
            COLLATERAL_REQUESTS.labels(r.service, entry.source).inc()
            return entry
        if self.config.offline:
            COLLATERAL_REQUESTS.labels(r.service, "error").inc()
            raise CollateralRequestError(404, f"{r.service} {r.name}: not cached and the agent is offline",
                                         "not_cached")
        try:
            self._recent_failure(key, now)
            if key not in self._inflight:  # joining a fetch under way costs nothing
                self._spend_budget(r)
            fetched = await self._single_flight(key, lambda: self._fetch(r))
        except CollateralRequestError:
            if entry is not None:
                COLLATERAL_REQUESTS.labels(r.service, "stale").inc()
                return Entry(entry.body, entry.chain, entry.expires_at, "stale")
            COLLATERAL_REQUESTS.labels(r.service, "error").inc()
            raise
        COLLATERAL_REQUESTS.labels(r.service, "upstream").inc()
        return fetched

    async def _single_flight(self, key: tuple[str, str], fetch: Callable[[], Awaitable[Entry]]) -> Entry:
        """Concurrent misses for one key share one upstream request."""
        future = self._inflight.get(key)
        if future is None:
            future = asyncio.ensure_future(fetch())
            self._inflight[key] = future
            future.add_done_callback(lambda _f: self._inflight.pop(key, None))
        return await asyncio.shield(future)

    def _recent_failure(self, key: tuple[str, str], now: float) -> None:
        """Raise the error of a fetch of ``key`` that failed less than negative_ttl ago."""
        failure = self._failures.get(key)
        if failure is None:
            return
        until, error = failure
        if now < until:
            COLLATERAL_UPSTREAM_FETCHES.labels(key[0], "negative_cached").inc()
            # a new exception each time: re-raising one instance would grow its traceback without end
            raise CollateralRequestError(error.status, str(error), error.code)
        del self._failures[key]

    def _remember_failure(self, key: tuple[str, str], error: CollateralRequestError) -> None:
        now = time.time()
        if len(self._failures) >= _MAX_REMEMBERED_FAILURES:
            self._failures = {k: v for k, v in self._failures.items() if v[0] > now}
            if len(self._failures) >= _MAX_REMEMBERED_FAILURES:
                self._failures.clear()
        self._failures[key] = (now + self.config.negative_ttl, error)

    def _spend_budget(self, r: Resource) -> None:
        """Take one upstream fetch from the requesting client's budget and the overall one."""
        client = FETCH_CLIENT.get() or "unattributed"
        if self._per_client.take(client) > 0 or self._overall.take(None) > 0:
            COLLATERAL_UPSTREAM_FETCHES.labels(r.service, "over_budget").inc()
            raise CollateralRequestError(429, f"{r.service} {r.name}: upstream fetch budget exhausted; retry later",
                                         "upstream_budget_exhausted")

    async def _fetch(self, r: Resource) -> Entry:
        """One upstream attempt, its failure remembered for negative_ttl."""
        try:
            return await self._fetch_once(r)
        except CollateralRequestError as exc:
            self._remember_failure((r.service, r.name), exc)
            raise

    async def _fetch_once(self, r: Resource) -> Entry:
        """One upstream attempt: the verifiers behind this cache retry with backoff themselves, and a
        retry here as well would multiply the requests an upstream outage or rate limit sees."""
        self.upstream_fetches += 1
        try:
            response = await afetch_with_backoff(self._http(), r.url, attempts=1, max_bytes=MAX_UPSTREAM_BYTES,
                                                 what=f"upstream {r.service}")
        except FetchError as exc:
            raise self._upstream_failed(r, exc) from None
        body = response.content
        chain = None
        if r.chain_header:
            chain = response.headers.get(r.chain_header) or (
                response.headers.get(_LEGACY_TCB_CHAIN_HEADER) if r.kind == "tcb_info" else None)
            if not chain:
                COLLATERAL_UPSTREAM_FETCHES.labels(r.service, "no_chain").inc()
                raise CollateralRequestError(502, f"upstream {r.service} answer lacks the {r.chain_header} header",
                                             "upstream_error")
        now = time.time()
        try:
            expires = _next_update(r, body, self.config.default_ttl, now)
        except (ValueError, KeyError, TypeError) as exc:
            COLLATERAL_UPSTREAM_FETCHES.labels(r.service, "unparseable").inc()
            raise CollateralRequestError(502, f"upstream {r.service} answer unusable ({type(exc).__name__})",
                                         "upstream_error") from None
        entry = Entry(body, chain, expires, "upstream")
        try:
            self._store(r, entry)
        except OSError as exc:  # a full disk must not stop serving
            log.warning("collateral cache write failed: %s", exc)
        self._memory[(r.service, r.name)] = Entry(body, chain, expires, "cache")
        COLLATERAL_UPSTREAM_FETCHES.labels(r.service, "ok").inc()
        return entry

    @staticmethod
    def _upstream_failed(r: Resource, exc: FetchError) -> CollateralRequestError:
        """Count a failed upstream fetch by outcome; the error to answer with (404 stays 404)."""
        if exc.reason == "status" and exc.status is not None:
            COLLATERAL_UPSTREAM_FETCHES.labels(r.service, str(exc.status)).inc()
            if exc.status == 404:
                return CollateralRequestError(404, f"upstream {r.service} answered 404", "upstream_not_found")
            return CollateralRequestError(502, f"upstream {r.service} answered {exc.status}", "upstream_error")
        if exc.reason == "too_large":
            COLLATERAL_UPSTREAM_FETCHES.labels(r.service, "too_large").inc()
            return CollateralRequestError(502, f"upstream {r.service} answer too large", "upstream_error")
        COLLATERAL_UPSTREAM_FETCHES.labels(r.service, "unreachable").inc()
        cause = type(exc.__cause__).__name__ if exc.__cause__ is not None else "error"
        return CollateralRequestError(502, f"upstream {r.service} unreachable ({cause})", "upstream_unreachable")

    # ---- HTTP-facing helpers -------------------------------------------------------------------
    async def serve(self, r: Resource, *, pem_crl: bool = False) -> Served:
        entry = await self.get(r)
        headers = {"Cube-Cache": entry.source}
        if r.chain_header and entry.chain is not None:
            headers[r.chain_header] = entry.chain
        body, media_type = entry.body, r.media_type
        if pem_crl:
            body = x509.load_der_x509_crl(body).public_bytes(serialization.Encoding.PEM)
            media_type = "application/x-pem-file"
        return Served(body, media_type, headers)


async def attribute_fetches_to_peer(request: Request) -> None:
    """Charge the upstream fetches this request causes to its peer address (unless already attributed)."""
    if FETCH_CLIENT.get() is None:
        FETCH_CLIENT.set(client_key(request.client.host) if request.client else "unknown")


def collateral_router(cache: CollateralCache) -> APIRouter:
    """FastAPI router with the KDS and PCS paths at the root and under /kds and /pcs."""
    router = APIRouter(dependencies=[Depends(attribute_fetches_to_peer)])

    def error(exc: CollateralRequestError) -> JSONResponse:
        return JSONResponse({"error": {"message": str(exc), "type": "collateral_error", "param": None,
                                       "code": exc.code}}, status_code=exc.status)

    async def respond(make: Callable[[], Resource], *, pem_crl: bool = False) -> Response:
        try:
            served = await cache.serve(make(), pem_crl=pem_crl)
        except CollateralRequestError as exc:
            return error(exc)
        return Response(served.body, media_type=served.media_type, headers=served.headers)

    def kds_routes(prefix: str, vlek: bool) -> None:
        kind = "vlek" if vlek else "vcek"

        @router.get(f"{prefix}/{kind}/v1/{{product}}/cert_chain", include_in_schema=not prefix)
        async def cert_chain(product: str) -> Response:
            return await respond(lambda: cache.kds_cert_chain(product, vlek=vlek))

        @router.get(f"{prefix}/{kind}/v1/{{product}}/crl", include_in_schema=not prefix)
        async def crl(product: str) -> Response:
            return await respond(lambda: cache.kds_crl(product, vlek=vlek))

    for prefix in ("", "/kds"):
        kds_routes(prefix, False)
        kds_routes(prefix, True)

        @router.get(f"{prefix}/vcek/v1/{{product}}/{{hwid}}", include_in_schema=not prefix)
        async def vcek(product: str, hwid: str, request: Request) -> Response:
            return await respond(lambda: cache.kds_vcek(product, hwid, dict(request.query_params)))

    for prefix in ("", "/pcs"):
        @router.get(f"{prefix}{TCB_PATH}", include_in_schema=not prefix)
        async def tcb(request: Request) -> Response:
            params = request.query_params
            if params.get("update", "standard") != "standard":
                return error(CollateralRequestError(400, "update: only standard is mirrored", "invalid_query"))
            return await respond(lambda: cache.pcs_tcb_info(params.get("fmspc", "")))

        @router.get(f"{prefix}{QE_IDENTITY_PATH}", include_in_schema=not prefix)
        async def qe_identity() -> Response:
            return await respond(cache.pcs_qe_identity)

        @router.get(f"{prefix}{PCK_CRL_PATH}", include_in_schema=not prefix)
        async def pck_crl(request: Request) -> Response:
            params = request.query_params
            encoding = params.get("encoding")
            if encoding not in (None, "der", "pem"):
                return error(CollateralRequestError(400, "encoding: der or pem", "invalid_query"))
            return await respond(lambda: cache.pcs_pck_crl(params.get("ca", "")), pem_crl=encoding != "der")

        @router.get(f"{prefix}/sgx/certification/v4/rootcacrl", include_in_schema=not prefix)
        async def root_ca_crl() -> Response:
            return await respond(cache.pcs_root_ca_crl)

        @router.get(f"{prefix}/IntelSGXRootCA.der", include_in_schema=not prefix)
        async def root_ca_crl_der() -> Response:
            return await respond(cache.pcs_root_ca_crl)

    return router
