"""AMD Key Distribution Service (KDS) client: VCEKs, ASK/ASVK+ARK chains and CRLs, with a disk cache.

Paths are those of https://kdsintf.amd.com (and of the host agent's collateral cache, which mirrors
them): ``/vcek/v1/{product}/cert_chain``, ``/vcek/v1/{product}/{hwid}?blSPL=..&teeSPL=..&snpSPL=..
&ucodeSPL=..`` (Turin: 16-hex hwid = CHIP_ID[0:8] and ``fmcSPL``), ``/vcek/v1/{product}/crl``,
``/vlek/v1/{product}/cert_chain`` and ``/vlek/v1/{product}/crl``.

KDS rate-limits (429) and has outages (5xx): those are retried with bounded exponential backoff
that honours Retry-After; any other 4xx fails at once (attestation.fetch). VCEKs are cached by (product, hwid, TCB),
chains by product, CRLs until their nextUpdate. In offline mode only the cache is read.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import httpx
from cryptography import x509

from ..errors import CollateralError, FetchError, ParseError
from ..fetch import atomic_write, fetch_with_backoff
from ..x509parse import load_pem_or_der_crl
from .certs import load_certificate, load_certificates
from .tcb import LAYOUT_TURIN, TcbVersion, decode_tcb, family_from_name, layout_for

DEFAULT_KDS_URL = "https://kdsintf.amd.com"
_PRODUCT_RE = re.compile(r"^[A-Za-z][A-Za-z0-9]{0,31}$")
MAX_RESPONSE = 1 << 20  # KDS objects are a few KiB


class KdsClient:
    """AMD KDS over httpx with a disk cache (see module docstring)."""

    def __init__(self, *, base_url: str = DEFAULT_KDS_URL, cache_dir: Path | None = None,
                 offline: bool = False, transport: httpx.BaseTransport | None = None,
                 timeout: float = 10.0, max_attempts: int = 4, backoff_base: float = 0.5,
                 backoff_max: float = 30.0, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc)) -> None:
        self.base_url = base_url.rstrip("/")
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.offline = offline
        self.max_attempts = max(1, max_attempts)
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self._sleep = sleep
        self._clock = clock
        self._transport = transport
        self._timeout = timeout
        self._client: httpx.Client | None = None
        self._memory: dict[str, bytes] = {}
        self._lock = threading.Lock()

    # --- public API -------------------------------------------------------------------------

    def cert_chain(self, product: str, *, vlek: bool = False) -> list[x509.Certificate]:
        """[ASK or ASVK, ARK] for ``product`` (a family such as "Milan" or a name like "Milan-B0")."""
        path = f"/{'vlek' if vlek else 'vcek'}/v1/{self._product(product)}/cert_chain"
        data = self._get(path, self._validate_chain)
        return load_certificates(data)

    def vcek(self, product: str, chip_id: bytes, reported_tcb: TcbVersion | int) -> x509.Certificate:
        """The VCEK of a chip at a REPORTED_TCB (use REPORTED_TCB, not CURRENT_TCB)."""
        return load_certificate(self._get(self.vcek_path(product, chip_id, reported_tcb), _validate_cert))

    def crl(self, product: str, *, vlek: bool = False) -> x509.CertificateRevocationList:
        """The ARK-signed CRL of ``product`` (re-fetched once past its nextUpdate)."""
        path = f"/{'vlek' if vlek else 'vcek'}/v1/{self._product(product)}/crl"
        return _load_crl(self._get(path, _validate_crl, fresh=self._crl_fresh))

    def vcek_path(self, product: str, chip_id: bytes, reported_tcb: TcbVersion | int) -> str:
        family = self._product(product)
        tcb = reported_tcb if isinstance(reported_tcb, TcbVersion) else decode_tcb(int(reported_tcb), family)
        turin = layout_for(family) == LAYOUT_TURIN
        if turin != (tcb.layout == LAYOUT_TURIN):
            raise ValueError(f"TCB layout {tcb.layout} does not fit product {family}")
        chip_id = bytes(chip_id)
        if len(chip_id) != 64:
            raise ValueError("chip_id must be the 64-byte CHIP_ID of the report")
        if not any(chip_id):
            raise CollateralError("CHIP_ID is zero (masked): no VCEK can be fetched for it")
        hwid = chip_id[:8].hex() if turin else chip_id.hex()
        query = f"blSPL={tcb.bl}&teeSPL={tcb.tee}&snpSPL={tcb.snp}&ucodeSPL={tcb.ucode}"
        if turin:
            query = f"fmcSPL={tcb.fmc}&" + query
        return f"/vcek/v1/{family}/{hwid}?{query}"

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> KdsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals ----------------------------------------------------------------------------

    @staticmethod
    def _product(product: str) -> str:
        family = family_from_name(product)
        if not _PRODUCT_RE.match(family):
            raise ValueError(f"invalid product name {product!r}")
        return family

    @staticmethod
    def _validate_chain(data: bytes) -> None:
        certs = load_certificates(data)
        if len(certs) != 2:
            raise ParseError(f"cert_chain holds {len(certs)} certificates, expected 2 (AS(V)K, ARK)")

    def _crl_fresh(self, data: bytes) -> bool:
        nu = _load_crl(data).next_update_utc
        return nu is not None and self._clock() <= nu

    def _cache_file(self, path: str) -> Path | None:
        if self.cache_dir is None:
            return None
        name = path.lstrip("/").replace("?", "@").replace("&", "+")
        return self.cache_dir / name

    def _get(self, path: str, validate: Callable[[bytes], None],
             fresh: Callable[[bytes], bool] | None = None) -> bytes:
        with self._lock:
            cached = self._memory.get(path)
        if cached is None:
            file = self._cache_file(path)
            if file is not None and file.is_file():
                cached = file.read_bytes()
                try:
                    validate(cached)
                except ParseError:
                    cached = None  # a damaged cache entry is refetched
        if cached is not None and (fresh is None or fresh(cached)):
            with self._lock:
                self._memory[path] = cached
            return cached
        if self.offline:
            state = "stale" if cached is not None else "not cached"
            raise CollateralError(f"offline: {path} is {state}")
        data = fetch_with_backoff(self._http(), path, attempts=self.max_attempts, backoff_base=self.backoff_base,
                                  backoff_max=self.backoff_max, sleep=self._sleep, clock=self._clock,
                                  max_bytes=MAX_RESPONSE, what="KDS").content
        try:
            validate(data)
        except ParseError as e:
            raise FetchError(f"KDS answered {path} with unusable data: {e}") from None
        if fresh is not None and not fresh(data):
            raise FetchError(f"KDS answered {path} with an expired CRL")
        self._store(path, data)
        return data

    def _store(self, path: str, data: bytes) -> None:
        with self._lock:
            self._memory[path] = data
        file = self._cache_file(path)
        if file is not None:
            atomic_write(file, data)

    def _http(self) -> httpx.Client:
        if self._client is None:
            self._client = httpx.Client(base_url=self.base_url, transport=self._transport,
                                        timeout=self._timeout, follow_redirects=False)
        return self._client


def _validate_cert(data: bytes) -> None:
    load_certificate(data)


def _load_crl(data: bytes) -> x509.CertificateRevocationList:
    return load_pem_or_der_crl(data, "KDS CRL")


def _validate_crl(data: bytes) -> None:
    """A usable CRL has a nextUpdate: without one it could be served (and cached) forever."""
    if _load_crl(data).next_update_utc is None:
        raise ParseError("the CRL has no nextUpdate")
