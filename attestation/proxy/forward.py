"""The attested upstream relay: one request of a local client, re-sent to the enclave over attested TLS.

Every upstream connection is made by :class:`AsyncAttestedClient`: the enclave is verified on it (evidence in
the certificate and for a fresh nonce, appraised with the policy) before httpcore writes a request byte, its key
is pinned, a new key is verified again, and any failure raises before sending. So a refused enclave never
receives the request, its body or the PAT. Redirects are never followed and no ``*_PROXY`` variable is used.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx

from ..atls.client import AsyncAttestedClient, AttestedTLSError, NotAttestedError, VerificationReport
from ..policy import Policy
from .envelope import ProxyError

log = logging.getLogger("cube.proxy")

# RFC 9110 7.6.1 connection options, plus headers the relay sets itself (Host, Content-Length) or handles
# on the client side only (Expect: 100-continue is answered by the proxy's HTTP server).
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate",
                        b"proxy-authorization", b"te", b"trailer", b"transfer-encoding", b"upgrade"})
_SET_BY_RELAY = frozenset({b"host", b"content-length", b"expect"})
# Claims about the client's address or scheme: the proxy is the client the enclave sees, a local caller must not
# speak for another (the enclave runs uvicorn with proxy_headers off, but nothing downstream should be trusted to).
_FORWARDING_CLAIMS = frozenset({b"forwarded", b"x-real-ip", b"x-forwarded-for", b"x-forwarded-host",
                                b"x-forwarded-proto", b"x-forwarded-port", b"x-forwarded-prefix"})
DEFAULT_TIMEOUT = httpx.Timeout(connect=10.0, read=600.0, write=60.0, pool=60.0)


def end_to_end_headers(headers: list[tuple[bytes, bytes]], *, drop: frozenset[bytes] = frozenset()
                       ) -> list[tuple[bytes, bytes]]:
    """``headers`` without hop-by-hop ones (also those a ``Connection`` header names) and without ``drop``."""
    named = {token.strip().lower() for name, value in headers if name.lower() == b"connection"
             for token in value.split(b",")}
    excluded = HOP_BY_HOP | named | drop
    return [(name, value) for name, value in headers if name.lower() not in excluded]


class Upstream:
    """The enclave origin, its attested client, and the PAT the proxy sets (None: the client's passes through)."""

    def __init__(self, origin: str, policy: Policy, *, pat: str | None = None,
                 timeout: httpx.Timeout = DEFAULT_TIMEOUT, **client_options: Any) -> None:
        """Raises PolicyError for a policy that pins no boot chain (unless it says ``allow_unmeasured``)."""
        self.client = AsyncAttestedClient(origin, policy=policy, timeout=timeout, **client_options)
        self.origin = self.client.attestor.origin_text
        self._url = httpx.URL(self.origin)
        self._pat = pat
        self._timeout = timeout.as_dict()

    @property
    def sets_authorization(self) -> bool:
        return self._pat is not None

    async def attest(self) -> VerificationReport:
        """Verify the enclave now (a new connection, cache ignored); raises AttestedTLSError when refused."""
        return await self.client.attest()

    def request_headers(self, client_headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """The client's end-to-end headers; with a PAT, its Authorization replaced by ours (empty ones too)."""
        drop = _SET_BY_RELAY | _FORWARDING_CLAIMS | ({b"authorization"} if self._pat is not None else frozenset())
        headers = end_to_end_headers(client_headers, drop=drop)
        if self._pat is not None:
            headers.append((b"authorization", f"Bearer {self._pat}".encode("ascii")))
        return headers

    async def open(self, method: bytes, target: bytes, client_headers: list[tuple[bytes, bytes]],
                   body: bytes | None) -> httpx.Response:
        """Send the request upstream and return the response with its body still unread (stream it, then close).

        Raises ProxyError: 502 ``attestation_failed`` (the enclave refused or unreachable: nothing was sent),
        504 ``upstream_timeout``, 502 ``upstream_unavailable`` (another transport failure).
        """
        url = self._url.copy_with(raw_path=target)
        # An httpx.Request built here, not client.build_request: no default headers of httpx's are added
        # (Accept-Encoding in particular: the body is relayed as received, so only what the client accepts).
        request = httpx.Request(method.decode("ascii"), url, headers=self.request_headers(client_headers),
                                content=body, extensions={"timeout": self._timeout})
        try:
            return await self.client.send(request, stream=True)
        except (AttestedTLSError, NotAttestedError) as exc:
            report = getattr(exc, "report", None)
            reason = (report.error if report is not None else None) or str(exc)
            raise ProxyError(502, "attestation_failed", f"the enclave at {self.origin} was not verified, so nothing "
                             f"was sent to it: {reason}") from None
        except httpx.ConnectError as exc:
            raise ProxyError(502, "attestation_failed", f"connect: the enclave at {self.origin} is unreachable, so "
                             f"it could not be verified and nothing was sent ({_short(exc)})") from None
        except httpx.TimeoutException as exc:
            raise ProxyError(504, "upstream_timeout", f"the enclave at {self.origin} did not answer in time "
                             f"({type(exc).__name__})") from None
        except httpx.TransportError as exc:
            raise ProxyError(502, "upstream_unavailable", f"the connection to the enclave at {self.origin} "
                             f"failed ({_short(exc)})") from None

    async def aclose(self) -> None:
        await self.client.aclose()


def _short(exc: BaseException) -> str:
    text = str(exc)[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
