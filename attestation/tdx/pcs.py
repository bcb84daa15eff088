"""Intel PCS v4 client for TDX collateral: TCB info, QE identity, PCK CRLs and the root CA CRL.

Paths and headers are Intel PCS v4's: /tdx/certification/v4/tcb?fmspc=.. (issuer chain in
TCB-Info-Issuer-Chain), /tdx/certification/v4/qe/identity (SGX-Enclave-Identity-Issuer-Chain),
/sgx/certification/v4/pckcrl?ca=platform|processor&encoding=der (SGX-PCK-CRL-Issuer-Chain); chains are
URL-encoded PEM. Intel serves the root CA CRL from certificates.trustedservices.intel.com; PCCS-style
mirrors (such as the Cube host agent) serve it at /sgx/certification/v4/rootcacrl.

Files are stored under the names load_collateral_dir() reads, so a cache directory is itself a valid
offline directory. Cached JSON/CRLs are reused until their nextUpdate. 429/5xx answers and transport
errors are retried with bounded backoff (attestation.fetch).
"""

from __future__ import annotations

import json
import re
import time
import urllib.parse
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import httpx

from ..errors import CollateralError, FetchError, ParseError
from ..fetch import atomic_write, fetch_with_backoff
from .chain import load_crl
from .collateral import Collateral, collateral_from_files

INTEL_PCS_URL = "https://api.trustedservices.intel.com"
INTEL_CERTS_URL = "https://certificates.trustedservices.intel.com"
INTEL_ROOT_CA_CRL_URL = INTEL_CERTS_URL + "/IntelSGXRootCA.der"
TCB_PATH = "/tdx/certification/v4/tcb"
QE_IDENTITY_PATH = "/tdx/certification/v4/qe/identity"
PCK_CRL_PATH = "/sgx/certification/v4/pckcrl"
ROOT_CA_CRL_PATH = "/sgx/certification/v4/rootcacrl"
TCB_CHAIN_HEADER = "TCB-Info-Issuer-Chain"
QE_CHAIN_HEADER = "SGX-Enclave-Identity-Issuer-Chain"
PCK_CRL_CHAIN_HEADER = "SGX-PCK-CRL-Issuer-Chain"
MAX_RESPONSE = 1 << 20

_FMSPC_RE = re.compile(r"^[0-9a-fA-F]{12}$")


def _next_update(name: str, data: bytes) -> datetime | None:
    """nextUpdate of a cached file (None when it cannot be read: treat as stale)."""
    try:
        if name.endswith(".json"):
            body = json.loads(data)
            inner = body.get("tcbInfo") or body.get("enclaveIdentity") or {}
            return datetime.fromisoformat(str(inner["nextUpdate"]).replace("Z", "+00:00"))
        if name.endswith(".crl"):
            return load_crl(data, name)[0].next_update_utc
    except (ValueError, KeyError, TypeError, AttributeError, ParseError):
        return None
    return None


class PcsClient:
    """Fetches TDX collateral from Intel PCS (or a mirror); caches on disk; offline directory and mode."""

    def __init__(
        self,
        *,
        base_url: str = INTEL_PCS_URL,
        cache_dir: Path | None = None,
        offline_dir: Path | None = None,
        offline: bool = False,
        transport: httpx.BaseTransport | None = None,
        root_ca_crl_url: str | None = None,
        timeout: float = 10.0,
        max_retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 8.0,
        api_key: str | None = None,
        clock: Callable[[], datetime] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.offline_dir = Path(offline_dir) if offline_dir is not None else None
        self.offline = offline
        if root_ca_crl_url is None:
            root_ca_crl_url = INTEL_ROOT_CA_CRL_URL if self.base_url == INTEL_PCS_URL else self.base_url + ROOT_CA_CRL_PATH
        self.root_ca_crl_url = root_ca_crl_url
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._clock = clock or (lambda: datetime.now(timezone.utc))
        self._sleep = sleep
        headers = {"Ocp-Apim-Subscription-Key": api_key} if api_key else {}
        self._http = httpx.Client(transport=transport, timeout=timeout, headers=headers, follow_redirects=False)
        self.network_fetches = 0  # observable for tests and metrics

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "PcsClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ public

    def collateral(self, fmspc: str, ca: str = "platform") -> Collateral:
        """Collateral for one FMSPC and PCK CA kind; CollateralError/FetchError when it cannot be had."""
        if not isinstance(fmspc, str) or not _FMSPC_RE.match(fmspc):
            raise CollateralError(f"FMSPC {fmspc!r} is not 12 hex digits")
        if ca not in ("platform", "processor"):
            raise CollateralError(f"PCK CA {ca!r} is not 'platform' or 'processor'")
        fmspc = fmspc.lower()
        files: dict[str, bytes] = {}
        tcb = f"tcb_info_{fmspc}.json"
        files.update(self._pair(tcb, f"{self.base_url}{TCB_PATH}?fmspc={fmspc}", TCB_CHAIN_HEADER))
        files.update(self._pair("qe_identity.json", f"{self.base_url}{QE_IDENTITY_PATH}", QE_CHAIN_HEADER))
        files.update(
            self._pair(
                f"pck_crl_{ca}.crl", f"{self.base_url}{PCK_CRL_PATH}?ca={ca}&encoding=der", PCK_CRL_CHAIN_HEADER
            )
        )
        files.update(self._pair("root_ca.crl", self.root_ca_crl_url, None))
        try:
            return collateral_from_files(files, fmspc)
        except ParseError as exc:
            raise CollateralError(f"collateral from {self.base_url} is malformed: {exc}") from None

    # ------------------------------------------------------------------------------------------ internals

    def _pair(self, name: str, url: str, chain_header: str | None) -> dict[str, bytes]:
        """One body file (+ its _chain.txt when the endpoint carries an issuer chain header)."""
        chain_name = name.rsplit(".", 1)[0] + "_chain.txt" if chain_header else None
        names = [name] + ([chain_name] if chain_name else [])
        if self.offline_dir is not None:
            found = self._read_dir(self.offline_dir, names)
            if found is not None:
                return found
        cached = self._read_dir(self.cache_dir, names) if self.cache_dir is not None else None
        if cached is not None:
            next_update = _next_update(name, cached[name])
            if self.offline or (next_update is not None and self._clock() <= next_update):
                return cached
        if self.offline:
            where = [str(p) for p in (self.offline_dir, self.cache_dir) if p is not None]
            raise CollateralError(f"offline: {name} not found in {where or 'any directory (none configured)'}")
        fetched = fetch_with_backoff(self._http, url, attempts=self.max_retries + 1, backoff_base=self.backoff,
                                     backoff_max=self.max_backoff, sleep=self._sleep, clock=self._clock,
                                     max_bytes=MAX_RESPONSE, what="Intel PCS", on_attempt=self._count_fetch)
        out = {name: fetched.content}
        if chain_header and chain_name:
            chain = fetched.headers.get(chain_header)
            if not chain or not chain.isascii():
                raise FetchError(f"{url}: response lacks an ASCII {chain_header} header")
            out[chain_name] = chain.encode("ascii")
        if self.cache_dir is not None:
            for fname, data in out.items():
                atomic_write(self.cache_dir / fname, data)
        return out

    def _count_fetch(self) -> None:
        self.network_fetches += 1

    @staticmethod
    def _read_dir(directory: Path | None, names: list[str]) -> dict[str, bytes] | None:
        if directory is None:
            return None
        paths = [directory / n for n in names]
        if not all(p.is_file() for p in paths):
            return None
        return {p.name: p.read_bytes() for p in paths}


def quote_chain_header(pem_chain: str) -> str:
    """PEM -> the URL-encoded form PCS puts in issuer-chain headers (for mirrors and fakes)."""
    return urllib.parse.quote(pem_chain, safe="")
