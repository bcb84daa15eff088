"""httpx clients (sync and async) that attest the enclave before any request leaves the machine.

Where the check happens: the client's httpcore pool uses a network backend of ours.  Right after
the TLS handshake of *every* new connection (inside ``start_tls``, before httpcore gets the stream
and so before a single byte of any request is written) the peer certificate of that connection is
read and its SPKI SHA-256 compared with the verdict cache:

* known and not expired -> the connection is handed to httpcore (pinned);
* unknown (first connection, another replica, key rotation, enclave restart) -> full verification on this same
  connection: the certificate's evidence (binding to its SPKI with the bundle's nonce), then
  ``GET /.well-known/cube-ai/attestation?nonce=<fresh>`` written on the same TLS stream and its
  evidence checked against the same SPKI and our nonce; both appraised with the caller's Policy
  through ``verify_evidence``.  Only then is the SPKI pinned and the connection released.

Verdicts are kept per SPKI: replicas behind one relay each have their own key (made in their own enclave),
so a client reaching several of them holds one verdict for each, and a key that fails is refused on that
connection only (the verdicts of the others stand). The cache is bounded (least recently used out first) and a
verdict expires after ``verdict_ttl`` or when the certificate it was made for does, whichever comes first.

Any failure closes the connection and raises :class:`AttestedTLSError` (carrying a
:class:`VerificationReport`) before request bytes are written.  Transient failures during a
verification (connection dropped, endpoint busy) are retried once on a fresh connection.  Requests
to any other origin are refused, redirects are never followed, environment proxies are ignored.

Certificate-authority validation is replaced by attestation here (the certificate is self-signed
by a key generated inside the enclave); nothing is trusted before the evidence checks pass. The
pool httpx builds for itself is replaced by ours at construction, checked to have taken
(:class:`NotAttestedError` if not); both carry a TLS context that completes no handshake, and only
our streams' ``start_tls`` (which attests) handshakes without CA validation. The openai-python
wrappers (``openai_client``) are in :mod:`attestation.atls.openai_clients`.
"""

from __future__ import annotations

import hashlib
import secrets
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import h11
import httpcore
import httpx

from ..errors import AttestationError, ParseError, PolicyError, VerificationError
from ..evidence import MAX_EVIDENCE_BYTES, Evidence, decode_cmw
from ..policy import Policy
from ..verdict import Check, Verdict
from ..x509parse import load_der_certificate
from .binding import NONCE_SIZE, nonce_from_binding, report_data_for, spki_der_of, spki_sha256
from .certificate import evidence_from_certificate

ATTESTATION_PATH = "/.well-known/cube-ai/attestation"
CMW_CBOR_MEDIA_TYPE = "application/cmw+cbor"
USER_AGENT = "cube-ai-atls/1"
DEFAULT_VERDICT_TTL = 300.0
DEFAULT_MAX_VERDICTS = 64  # SPKIs (replicas x key rotations within a TTL) whose verdicts a client keeps
DEFAULT_IO_TIMEOUT = 10.0

VerifyFn = Callable[..., Verdict]


# -- report and errors ---------------------------------------------------------------------------
@dataclass
class VerificationReport:
    """Every step of one verification of an enclave connection, with pass/fail and why."""

    origin: str
    steps: list[Check] = field(default_factory=list)
    spki_sha256: str | None = None
    previous_pin: str | None = None
    certificate_verdict: Verdict | None = None
    fresh_verdict: Verdict | None = None
    ok: bool = False
    error: str | None = None
    verified_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))

    def passed(self, name: str, detail: str = "") -> None:
        self.steps.append(Check(name, True, detail))

    def failed(self, name: str, detail: str, *, retryable: bool = False) -> "AttestedTLSError":
        self.steps.append(Check(name, False, detail))
        self.ok = False
        self.error = f"{name}: {detail}"
        return AttestedTLSError(self.error, self, retryable=retryable)

    @property
    def status(self) -> str:
        """The verifier's status words: the evidence verdict's when it decided, else from the failing step."""
        verdict = self.fresh_verdict or self.certificate_verdict
        if self.ok and verdict is not None:
            return verdict.status
        if verdict is not None and not verdict.ok:
            return verdict.status
        failing = next((s.name for s in reversed(self.steps) if not s.ok), "")
        if failing in ("certificate", "certificate_evidence"):
            return "malformed"
        if failing in ("connect", "tls_handshake"):
            return "error"
        return "invalid"

    def to_json(self) -> dict[str, Any]:
        """The shape of the other ``cube-attest verify-*`` commands, plus the pinned SPKI hash."""
        verdict = self.fresh_verdict or self.certificate_verdict
        checks = [c.to_json() for c in self.steps]
        if verdict is not None:
            checks += [{**c.to_json(), "name": f"evidence.{c.name}"} for c in verdict.checks]
        return {
            "ok": self.ok,
            "platform": verdict.platform if verdict else None,
            "product": verdict.product if verdict else None,
            "status": self.status,
            "claims": verdict.claims if verdict and verdict.ok else {},
            "checks": checks,
            "error": self.error,
            "spki_sha256": self.spki_sha256,
        }


class NotAttestedError(AttestationError):
    """A path that would not be attested TLS (an unchecked pool, a WebSocket of openai's): refused, nothing sent."""


class AttestedTLSError(VerificationError):
    """The enclave behind a connection could not be verified; nothing carrying credentials was sent."""

    def __init__(self, message: str, report: VerificationReport, *, retryable: bool = False) -> None:
        super().__init__(message, report.steps)
        self.report = report
        self.retryable = retryable


# -- the HTTP exchange for the fresh-nonce evidence (sans-IO) ------------------------------------
class _NonceExchange:
    """Request bytes and incremental response parsing for the attestation endpoint (h11)."""

    def __init__(self, host_header: str, nonce: bytes) -> None:
        self._conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=16 * 1024)
        target = f"{ATTESTATION_PATH}?nonce={nonce.hex()}"
        headers = [("Host", host_header), ("Accept", CMW_CBOR_MEDIA_TYPE), ("User-Agent", USER_AGENT)]
        self.outgoing = self._conn.send(h11.Request(method="GET", target=target, headers=headers))
        self.outgoing += self._conn.send(h11.EndOfMessage())
        self.status: int | None = None
        self.content_type = ""
        self.body = bytearray()

    def receive(self, data: bytes) -> bool:
        """Feed bytes read from the stream; True once the whole response has arrived."""
        self._conn.receive_data(data)
        while True:
            event = self._conn.next_event()
            if event is h11.NEED_DATA:
                if not data:
                    raise h11.RemoteProtocolError("connection closed before the response was complete")
                return False
            if isinstance(event, h11.Response):
                self.status = event.status_code
                for name, value in event.headers:
                    if name == b"content-type":
                        self.content_type = value.decode("latin-1").split(";")[0].strip().lower()
            elif isinstance(event, h11.Data):
                self.body += event.data
                if len(self.body) > MAX_EVIDENCE_BYTES:
                    raise h11.RemoteProtocolError("attestation response larger than the evidence limit")
            elif isinstance(event, h11.EndOfMessage):
                return True
            elif isinstance(event, h11.ConnectionClosed):
                raise h11.RemoteProtocolError("connection closed before the response was complete")

    def reusable(self) -> bool:
        """The connection is clean for the next request: keep-alive and no stray bytes."""
        trailing, closed = self._conn.trailing_data
        return self._conn.their_state is h11.DONE and self._conn.our_state is h11.DONE and not trailing and not closed


# -- shared verification state -------------------------------------------------------------------
def _origin_of(url: httpx.URL | str) -> tuple[str, str, int]:
    url = httpx.URL(str(url))
    default = 443 if url.scheme == "https" else 80
    return url.scheme, (url.host or "").lower(), url.port or default


def _bracketed(host: str) -> str:
    """The host as written in a URL or Host header (IPv6 literals in brackets)."""
    return f"[{host}]" if ":" in host else host


@dataclass(frozen=True)
class _CertificateFacts:
    spki_der: bytes
    spki_hex: str
    evidence: Evidence
    nonce: bytes
    not_after: datetime


class Attestor:
    """Verification state shared by a client's connections: policy, verdict cache, current pin."""

    def __init__(
        self,
        base_url: str,
        policy: Policy,
        *,
        verify_fn: VerifyFn | None = None,
        verdict_ttl: float = DEFAULT_VERDICT_TTL,
        io_timeout: float = DEFAULT_IO_TIMEOUT,
        kds: Any = None,
        pcs: Any = None,
        max_verdicts: int = DEFAULT_MAX_VERDICTS,
    ) -> None:
        """``kds``/``pcs``: a KdsClient / PcsClient the verifier fetches missing AMD CRLs / Intel collateral
        from (e.g. AMD KDS and Intel PCS, or a mirror: all of it is vendor-signed); with ``pcs`` the verifier
        always uses its own TDX collateral, never what the evidence carries (the host assembles evidence);
        default: only what the evidence carries."""
        scheme, host, port = _origin_of(base_url)
        if scheme != "https" or not host:
            raise ValueError(f"attested TLS needs an https:// URL with a host, got {base_url!r}")
        if not isinstance(policy, Policy):
            raise TypeError("policy must be an attestation.policy.Policy")
        if verify_fn is None:
            from ..verifier import verify_evidence

            verify_fn = verify_evidence
        self.origin = (scheme, host, port)
        self.policy = policy
        self._verify = verify_fn
        self._collateral_sources = {k: v for k, v in (("kds", kds), ("pcs", pcs)) if v is not None}
        if max_verdicts < 1:
            raise ValueError("max_verdicts must be at least 1")
        self.verdict_ttl = verdict_ttl
        self.io_timeout = io_timeout
        self.max_verdicts = max_verdicts
        self._lock = threading.Lock()
        self._trusted: OrderedDict[str, float] = OrderedDict()  # spki sha256 hex -> monotonic expiry, LRU order
        self.pinned: str | None = None  # the SPKI verified last
        self.last_report: VerificationReport | None = None
        self.verifications = 0

    @property
    def origin_text(self) -> str:
        scheme, host, port = self.origin
        return f"{scheme}://{host}:{port}"

    @property
    def host_header(self) -> str:
        _, host, port = self.origin
        return _bracketed(host) if port == 443 else f"{_bracketed(host)}:{port}"

    def require_origin(self, url: httpx.URL) -> None:
        """Refuse any request that is not for the attested origin (so credentials go nowhere else)."""
        if _origin_of(url) != self.origin:
            report = VerificationReport(self.origin_text)
            raise report.failed("origin", f"refusing a request for {url.scheme}://{url.host}:{url.port or ''}; "
                                f"this client only talks to {self.origin_text}")

    def trusted(self, spki_hex: str) -> bool:
        with self._lock:
            expiry = self._trusted.get(spki_hex)
            if expiry is None:
                return False
            if time.monotonic() >= expiry:
                del self._trusted[spki_hex]
                return False
            self._trusted.move_to_end(spki_hex)
            return True

    def trusted_spkis(self) -> list[str]:
        """The SPKI SHA-256s (hex) with a live verdict, least recently used first."""
        now = time.monotonic()
        with self._lock:
            return [spki for spki, expiry in self._trusted.items() if expiry > now]

    def forget(self) -> None:
        """Drop every cached verdict (the next connection is verified from scratch)."""
        with self._lock:
            self._trusted.clear()

    # steps ---------------------------------------------------------------------------------------
    def new_report(self) -> VerificationReport:
        with self._lock:
            report = VerificationReport(self.origin_text, previous_pin=self.pinned)
            self.verifications += 1
            self.last_report = report
        return report

    def certificate_facts(self, report: VerificationReport, cert_der: bytes | None) -> _CertificateFacts:
        if not cert_der:
            raise report.failed("certificate", "the server presented no certificate")
        try:
            cert = load_der_certificate(cert_der, "server certificate")  # every field decoded, or ParseError
        except ParseError as exc:
            raise report.failed("certificate", str(exc)) from None
        spki_der = spki_der_of(cert)
        spki_hex = spki_sha256(spki_der)
        report.spki_sha256 = spki_hex
        now = datetime.now(timezone.utc)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise report.failed("certificate", f"outside its validity ({cert.not_valid_before_utc:%Y-%m-%d %H:%M} "
                                f"to {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC)")
        detail = f"SPKI SHA-256 {spki_hex}"
        if report.previous_pin and report.previous_pin != spki_hex:
            detail += (f" (the key verified last was {report.previous_pin}: another replica, a key rotation or a "
                       "restart; re-verifying)")
        report.passed("certificate", detail)
        try:
            evidence = decode_cmw(evidence_from_certificate(cert))
            nonce = nonce_from_binding(evidence.binding)
        except AttestationError as exc:
            raise report.failed("certificate_evidence", str(exc)) from None
        report.passed("certificate_evidence", f"{evidence.platform} evidence in id-pe-cmw")
        return _CertificateFacts(spki_der, spki_hex, evidence, nonce, cert.not_valid_after_utc)

    def _appraise(self, report: VerificationReport, name: str, evidence: Evidence, expected: bytes) -> Verdict:
        try:
            verdict = self._verify(evidence, policy=self.policy, expected_report_data=expected,
                                   **self._collateral_sources)
        except AttestationError as exc:  # verify_evidence should not raise; fail closed if it does
            raise report.failed(name, str(exc)) from None
        if name == "certificate_appraisal":
            report.certificate_verdict = verdict
        else:
            report.fresh_verdict = verdict
        if not verdict.ok:
            raise report.failed(name, f"refused by policy {self.policy.name!r}: {verdict.error}")
        report.passed(name, f"{verdict.platform} {verdict.product or ''} accepted by policy {self.policy.name!r} "
                      f"(status {verdict.status})".replace("  ", " "))
        # Belt and braces: the verified report_data must be exactly the binding we expect.
        seen = str(verdict.claims.get("report_data", "")).lower()
        binding = name.replace("_appraisal", "_binding")
        if seen != expected.hex():
            raise report.failed(binding, "report_data is not bound to this connection's key and nonce")
        report.passed(binding, "report_data = SHA-512(label || SHA-256(SPKI) || nonce)")
        return verdict

    def appraise_certificate(self, report: VerificationReport, facts: _CertificateFacts) -> None:
        expected = report_data_for(facts.spki_der, facts.nonce)
        self._appraise(report, "certificate_appraisal", facts.evidence, expected)

    def fresh_evidence(self, report: VerificationReport, exchange: _NonceExchange, nonce: bytes) -> Evidence:
        if exchange.status != 200:
            raise report.failed("nonce_roundtrip", f"attestation endpoint answered HTTP {exchange.status}",
                                retryable=exchange.status in (429, 502, 503, 504))
        if exchange.content_type != CMW_CBOR_MEDIA_TYPE:
            raise report.failed("nonce_roundtrip", f"unexpected content type {exchange.content_type!r:.60}")
        if not exchange.reusable():
            raise report.failed("nonce_roundtrip", "connection not reusable after the attestation response",
                                retryable=True)
        try:
            evidence = decode_cmw(bytes(exchange.body))
            echoed = nonce_from_binding(evidence.binding)
        except AttestationError as exc:
            raise report.failed("nonce_roundtrip", str(exc)) from None
        if not secrets.compare_digest(echoed, nonce):
            raise report.failed("nonce_roundtrip", "evidence is not for the nonce we sent (replayed?)")
        report.passed("nonce_roundtrip", f"fresh {evidence.platform} evidence for our nonce on the same connection")
        return evidence

    def appraise_fresh(self, report: VerificationReport, facts: _CertificateFacts, evidence: Evidence,
                       nonce: bytes) -> None:
        expected = report_data_for(facts.spki_der, nonce)
        self._appraise(report, "nonce_appraisal", evidence, expected)

    def pin(self, report: VerificationReport, facts: _CertificateFacts) -> None:
        """Keep the verdict for this SPKI (beside those of other replicas) until the TTL or the certificate ends."""
        lifetime = min(self.verdict_ttl, (facts.not_after - datetime.now(timezone.utc)).total_seconds())
        with self._lock:
            self._trusted[facts.spki_hex] = time.monotonic() + lifetime
            self._trusted.move_to_end(facts.spki_hex)
            while len(self._trusted) > self.max_verdicts:
                self._trusted.popitem(last=False)
            self.pinned = facts.spki_hex
        report.ok = True
        report.error = None
        report.passed("pinned", f"SPKI SHA-256 {facts.spki_hex} for {lifetime:g} s")

    def transport_failure(self, report: VerificationReport, exc: BaseException) -> AttestedTLSError:
        return report.failed("nonce_roundtrip", f"connection failed during verification ({type(exc).__name__}: "
                             f"{str(exc)[:160]})", retryable=True)

    def handshake_failure(self, exc: BaseException) -> AttestedTLSError:
        """The error of an explicit attest() whose TCP connect or TLS handshake failed."""
        report = self.new_report()
        return report.failed("tls_handshake", f"{type(exc).__name__}: {str(exc)[:160]}")

    def finished_report(self) -> VerificationReport:
        assert self.last_report is not None
        return self.last_report


def _peer_certificate(stream: Any) -> bytes | None:
    ssl_object = stream.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    return ssl_object.getpeercert(True)


def _cached_spki(attestor: Attestor, cert_der: bytes | None, force: bool) -> str | None:
    """The SPKI hash of the peer certificate when it has a live verdict (fast path), else None."""
    if not cert_der or force:
        return None
    try:
        spki_hex = hashlib.sha256(spki_der_of(load_der_certificate(cert_der, "server certificate"))).hexdigest()
    except ParseError:
        return None  # the full verification reports it
    return spki_hex if attestor.trusted(spki_hex) else None


def client_ssl_context() -> ssl.SSLContext:
    """TLS for attested connections: CA validation replaced by the evidence checks after the handshake.

    Made only inside our streams' ``start_tls``, which checks the evidence before the stream is handed
    on; every pool and caller holds :func:`refusing_ssl_context` instead.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the certificate is self-signed; trust comes from the attested SPKI
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def refusing_ssl_context() -> ssl.SSLContext:
    """A client context under which no TLS handshake can complete: certificates required, no trust anchor.

    This is what httpx's own pool (which ours replace at construction) and our pools carry: should the
    pool replacement or our network backend ever not take effect (an httpx/httpcore change), the
    connection refuses every server (no default or ``SSL_CERT_FILE`` roots are loaded) instead of
    talking unattested TLS. Only our attesting streams handshake, with :func:`client_ssl_context`.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # no load_default_certs(): the trust store stays empty
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = True
    return ctx


# -- the verification of one new connection, written once (sans-IO) ------------------------------
# The flow below yields what it needs done on the connection; a sync and an async driver do it.
_READ = object()  # step: read from the stream and send the bytes back in
_TRANSPORT_ERRORS = (httpcore.NetworkError, httpcore.TimeoutException, h11.ProtocolError, OSError)
_HANDSHAKE_ERRORS = (httpcore.NetworkError, httpcore.TimeoutException, OSError, ssl.SSLError)


@dataclass(frozen=True)
class _Call:
    """Step: call ``fn(*args)``; the async driver runs it in a worker thread (appraisal may fetch collateral)."""

    fn: Callable[..., None]
    args: tuple[Any, ...]


def _admission(attestor: Attestor, cert_der: bytes | None, force: bool) -> Generator[Any, Any, str]:
    """Admit a freshly handshaken connection: its SPKI SHA-256 (hex) once pinned, else AttestedTLSError.

    Steps yielded: bytes (write them), ``_READ`` (send back the bytes read), a ``_Call`` (make it). What a
    step raises is thrown back in here, so every failure is judged and reported in this one place.
    """
    spki_hex = _cached_spki(attestor, cert_der, force)
    if spki_hex is not None:
        return spki_hex
    report = attestor.new_report()
    facts = attestor.certificate_facts(report, cert_der)
    yield _Call(attestor.appraise_certificate, (report, facts))
    nonce = secrets.token_bytes(NONCE_SIZE)
    exchange = _NonceExchange(attestor.host_header, nonce)
    try:
        yield exchange.outgoing
        while not exchange.receive((yield _READ)):
            pass
    except _TRANSPORT_ERRORS as exc:
        raise attestor.transport_failure(report, exc) from None
    evidence = attestor.fresh_evidence(report, exchange, nonce)
    yield _Call(attestor.appraise_fresh, (report, facts, evidence, nonce))
    attestor.pin(report, facts)
    return facts.spki_hex


def _admit_sync(attestor: Attestor, tls: httpcore.NetworkStream, force: bool) -> _PinnedStream:
    flow = _admission(attestor, _peer_certificate(tls), force)
    resume, value = flow.send, None
    while True:
        try:
            step = resume(value)
        except StopIteration as done:
            return _PinnedStream(tls, attestor, done.value)
        try:
            if step is _READ:
                value = tls.read(65536, attestor.io_timeout)
            elif isinstance(step, _Call):
                value = step.fn(*step.args)
            else:
                value = tls.write(step, attestor.io_timeout)
            resume = flow.send
        except Exception as exc:  # handed to the flow, which decides what it means
            resume, value = flow.throw, exc


async def _admit_async(attestor: Attestor, tls: httpcore.AsyncNetworkStream, force: bool) -> _AsyncPinnedStream:
    import anyio.to_thread

    flow = _admission(attestor, _peer_certificate(tls), force)
    resume, value = flow.send, None
    while True:
        try:
            step = resume(value)
        except StopIteration as done:
            return _AsyncPinnedStream(tls, attestor, done.value)
        try:
            if step is _READ:
                value = await tls.read(65536, attestor.io_timeout)
            elif isinstance(step, _Call):
                value = await anyio.to_thread.run_sync(step.fn, *step.args)
            else:
                value = await tls.write(step, attestor.io_timeout)
            resume = flow.send
        except Exception as exc:
            resume, value = flow.throw, exc


# -- network streams: what sync and async share, then their I/O -----------------------------------
class _Wrapped:
    """A network stream of httpcore's (sync or async) with the Attestor that watches it."""

    def __init__(self, inner: Any, attestor: Attestor) -> None:
        self._inner = inner
        self._attestor = attestor

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _Pinned(_Wrapped):
    """A verified TLS stream; looks 'readable' (so httpcore drops it when idle) once its verdict expired."""

    def __init__(self, inner: Any, attestor: Attestor, spki_hex: str) -> None:
        super().__init__(inner, attestor)
        self.spki_sha256 = spki_hex

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable" and not self._attestor.trusted(self.spki_sha256):
            return True
        if info == "cube_ai_spki_sha256":
            return self.spki_sha256
        return super().get_extra_info(info)


class _Unattested(_Wrapped):
    """A TCP stream that verifies the enclave right after its TLS handshake and never writes in clear."""

    def __init__(self, inner: Any, attestor: Attestor, force: bool = False) -> None:
        super().__init__(inner, attestor)
        self._force = force

    def _refusal(self) -> AttestedTLSError:
        return AttestedTLSError("refusing to write on a connection without attested TLS",
                                VerificationReport(self._attestor.origin_text))


class _PinnedStream(_Pinned, httpcore.NetworkStream):
    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, timeout)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, timeout)

    def close(self) -> None:
        self._inner.close()


class _TcpStream(_Unattested, httpcore.NetworkStream):
    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, timeout)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        raise self._refusal()

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        # ssl_context (the pool's, a refusing one) is not used: attestation below replaces CA validation
        tls = self._inner.start_tls(client_ssl_context(), server_hostname, timeout)
        try:
            return _admit_sync(self._attestor, tls, self._force)
        except BaseException:
            tls.close()
            raise


class _AsyncPinnedStream(_Pinned, httpcore.AsyncNetworkStream):
    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self._inner.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()


class _AsyncTcpStream(_Unattested, httpcore.AsyncNetworkStream):
    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self._inner.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        raise self._refusal()

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                        timeout: float | None = None) -> httpcore.AsyncNetworkStream:
        tls = await self._inner.start_tls(client_ssl_context(), server_hostname, timeout)  # as in _TcpStream
        try:
            return await _admit_async(self._attestor, tls, self._force)
        except BaseException:
            await tls.aclose()
            raise


# -- network backends ----------------------------------------------------------------------------
class _SyncAttestingBackend(httpcore.NetworkBackend):
    def __init__(self, attestor: Attestor, inner: httpcore.NetworkBackend | None = None) -> None:
        self._attestor = attestor
        self._inner = inner or httpcore.SyncBackend()

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Any = None) -> httpcore.NetworkStream:
        stream = self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        return _TcpStream(stream, self._attestor)

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Any = None) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("attested TLS does not use unix sockets")

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class _AsyncAttestingBackend(httpcore.AsyncNetworkBackend):
    def __init__(self, attestor: Attestor, inner: httpcore.AsyncNetworkBackend | None = None) -> None:
        self._attestor = attestor
        self._inner = inner or httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None, socket_options: Any = None
                          ) -> httpcore.AsyncNetworkStream:
        stream = await self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        return _AsyncTcpStream(stream, self._attestor)

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Any = None) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("attested TLS does not use unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


# -- httpx transports ----------------------------------------------------------------------------
def _pool_kwargs(limits: httpx.Limits) -> dict[str, Any]:
    return {
        "max_connections": limits.max_connections,
        "max_keepalive_connections": limits.max_keepalive_connections,
        "keepalive_expiry": limits.keepalive_expiry,
        "http1": True,
        "http2": False,
    }


def _install_pool(transport: httpx.HTTPTransport | httpx.AsyncHTTPTransport, pool: Any) -> None:
    """Make ``pool`` the one connection pool of an httpx transport, or raise: never a pool we did not build.

    httpx has no public hook for the network backend, so its transport's private ``_pool`` is replaced;
    this checks that the replacement took (the pool we built, with our backend, and no other pool left on
    the transport) so an httpx/httpcore change fails here, at construction, not open at request time.
    """
    transport._pool = pool  # type: ignore[assignment]
    _check_pool(transport, pool)


def _check_pool(transport: Any, pool: Any) -> None:
    backend = getattr(pool, "_network_backend", None)
    pools = [value for value in vars(transport).values()
             if isinstance(value, (httpcore.ConnectionPool, httpcore.AsyncConnectionPool))]
    if (getattr(transport, "_pool", None) is not pool
            or not isinstance(backend, (_SyncAttestingBackend, _AsyncAttestingBackend))
            or pools != [pool]):
        raise NotAttestedError(
            f"the attested connection pool did not take effect in httpx {httpx.__version__} / httpcore "
            f"{httpcore.__version__} (pool {type(getattr(transport, '_pool', None)).__name__}, backend "
            f"{type(backend).__name__}); refusing to build a client whose connections might not be attested"
        )


class _AttestedHTTPTransport(httpx.HTTPTransport):
    """httpx's transport (its request/response and error mapping) over an attesting httpcore pool."""

    def __init__(self, attestor: Attestor, limits: httpx.Limits) -> None:
        super().__init__(verify=refusing_ssl_context(), trust_env=False, limits=limits)
        _install_pool(self, httpcore.ConnectionPool(ssl_context=refusing_ssl_context(),
                                                    network_backend=_SyncAttestingBackend(attestor),
                                                    **_pool_kwargs(limits)))


class _AsyncAttestedHTTPTransport(httpx.AsyncHTTPTransport):
    def __init__(self, attestor: Attestor, limits: httpx.Limits) -> None:
        super().__init__(verify=refusing_ssl_context(), trust_env=False, limits=limits)
        _install_pool(self, httpcore.AsyncConnectionPool(ssl_context=refusing_ssl_context(),
                                                         network_backend=_AsyncAttestingBackend(attestor),
                                                         **_pool_kwargs(limits)))


class _GuardedTransport(httpx.BaseTransport):
    """Origin check, then the request; one retry when a verification failed transiently before sending."""

    def __init__(self, inner: httpx.BaseTransport, attestor: Attestor) -> None:
        self._inner = inner
        self._attestor = attestor

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self._attestor.require_origin(request.url)
        try:
            return self._inner.handle_request(request)
        except AttestedTLSError as exc:
            if not exc.retryable:
                raise
        return self._inner.handle_request(request)

    def close(self) -> None:
        self._inner.close()


class _AsyncGuardedTransport(httpx.AsyncBaseTransport):
    def __init__(self, inner: httpx.AsyncBaseTransport, attestor: Attestor) -> None:
        self._inner = inner
        self._attestor = attestor

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self._attestor.require_origin(request.url)
        try:
            return await self._inner.handle_async_request(request)
        except AttestedTLSError as exc:
            if not exc.retryable:
                raise
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


_RESERVED = ("transport", "mounts", "verify", "cert", "follow_redirects", "proxy", "trust_env", "http2", "app")
DEFAULT_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20, keepalive_expiry=30.0)


# -- public clients ------------------------------------------------------------------------------
def require_measured_policy(policy: Policy) -> None:
    """Refuse, before any connection, a policy under which any image on genuine hardware would be trusted.

    A client sends credentials once the enclave is verified; if the policy does not pin the whole boot chain
    (``Policy.measurement_gaps``: firmware-only digests count as unmeasured), a host could boot an OS of its
    own on genuine SNP/TDX hardware and receive them. ``allow_unmeasured: true`` in the
    policy opts out explicitly (``cube-attest verify-url`` only inspects, so it does not require this).
    """
    gaps = policy.measurement_gaps()  # the one definition of "measured" (attestation.policy)
    if gaps and not policy.allow_unmeasured:
        raise PolicyError(
            f"policy {policy.name!r} does not pin the whole boot chain ("
            + "; ".join(f"{platform}: {why}" for platform, why in gaps.items())
            + "): a host could run its own OS on genuine hardware and receive your credentials; list the expected "
            "measurements (SNP: `cube-host measure --kernel ...`; TDX: MRTD and RTMR0-2), or set "
            "allow_unmeasured: true to accept that risk"
        )


class _AttestedClientBase:
    """What both clients share: their Attestor, the httpx options they fix, the transports, the last report."""

    _transports: tuple[type, type]  # (guarding transport, attesting transport) of the sync or async kind

    def __init__(self, base_url: str, *, policy: Policy, verdict_ttl: float = DEFAULT_VERDICT_TTL,
                 verify_fn: VerifyFn | None = None, limits: httpx.Limits = DEFAULT_LIMITS,
                 io_timeout: float = DEFAULT_IO_TIMEOUT, require_measurement: bool = True, kds: Any = None,
                 pcs: Any = None, max_verdicts: int = DEFAULT_MAX_VERDICTS, **kwargs: Any) -> None:
        for name in _RESERVED:
            if name in kwargs:
                raise TypeError(f"{name}= cannot be set on an attested client")
        if require_measurement:
            require_measured_policy(policy)
        self.attestor = Attestor(base_url, policy, verify_fn=verify_fn, verdict_ttl=verdict_ttl,
                                 io_timeout=io_timeout, kds=kds, pcs=pcs, max_verdicts=max_verdicts)
        guarding, attesting = self._transports
        transport = guarding(attesting(self.attestor, limits), self.attestor)
        super().__init__(base_url=base_url, transport=transport, follow_redirects=False,  # type: ignore[call-arg]
                         trust_env=False, limits=limits, **kwargs)
        chosen = getattr(self, "_transport_for_url", lambda url: None)(self.base_url)
        if chosen is not transport:  # httpx chose another transport for our origin: it would not be attested
            raise NotAttestedError(f"httpx {httpx.__version__} did not route {self.attestor.origin_text} through "
                                   f"the attested transport (got {type(chosen).__name__}); refusing to build it")

    @property
    def verification_report(self) -> VerificationReport | None:
        """The report of the most recent verification (also attached to every AttestedTLSError)."""
        return self.attestor.last_report


class AttestedClient(_AttestedClientBase, httpx.Client):
    """An httpx.Client bound to one attested enclave origin (see the module docstring)."""

    _transports = (_GuardedTransport, _AttestedHTTPTransport)

    def send(self, request: httpx.Request, *, stream: bool = False, auth: Any = httpx.USE_CLIENT_DEFAULT,
             follow_redirects: Any = httpx.USE_CLIENT_DEFAULT) -> httpx.Response:
        return super().send(request, stream=stream, auth=auth, follow_redirects=False)  # redirects never followed

    def attest(self) -> VerificationReport:
        """Verify the enclave now on a new connection (cache ignored), close it, and return the report."""
        _, host, port = self.attestor.origin
        raw = httpcore.SyncBackend().connect_tcp(host, port, timeout=self.attestor.io_timeout)
        tcp = _TcpStream(raw, self.attestor, force=True)
        try:
            tls = tcp.start_tls(refusing_ssl_context(), host, self.attestor.io_timeout)
        except AttestedTLSError:
            raise
        except _HANDSHAKE_ERRORS as exc:
            raise self.attestor.handshake_failure(exc) from None
        tls.close()
        return self.attestor.finished_report()


class AsyncAttestedClient(_AttestedClientBase, httpx.AsyncClient):
    """The asyncio twin of :class:`AttestedClient`."""

    _transports = (_AsyncGuardedTransport, _AsyncAttestedHTTPTransport)

    async def send(self, request: httpx.Request, *, stream: bool = False, auth: Any = httpx.USE_CLIENT_DEFAULT,
                   follow_redirects: Any = httpx.USE_CLIENT_DEFAULT) -> httpx.Response:
        return await super().send(request, stream=stream, auth=auth, follow_redirects=False)

    async def attest(self) -> VerificationReport:
        _, host, port = self.attestor.origin
        raw = await httpcore.AnyIOBackend().connect_tcp(host, port, timeout=self.attestor.io_timeout)
        tcp = _AsyncTcpStream(raw, self.attestor, force=True)
        try:
            tls = await tcp.start_tls(refusing_ssl_context(), host, self.attestor.io_timeout)
        except AttestedTLSError:
            raise
        except _HANDSHAKE_ERRORS as exc:
            raise self.attestor.handshake_failure(exc) from None
        await tls.aclose()
        return self.attestor.finished_report()


def _origin_url(base_url: str) -> str:
    scheme, host, port = _origin_of(base_url)
    return f"{scheme}://{_bracketed(host)}:{port}"


def openai_client(base_url: str, api_key: str, policy: Policy, *, verdict_ttl: float = DEFAULT_VERDICT_TTL,
                  verify_fn: VerifyFn | None = None, kds: Any = None, pcs: Any = None, **openai_kwargs: Any) -> Any:
    """``openai.OpenAI`` whose every request goes through an :class:`AttestedClient` for ``base_url``'s origin.

    Its WebSocket features (realtime, Responses WebSocket mode, ...) are not attested and raise
    :class:`NotAttestedError` before connecting (see :mod:`attestation.atls.openai_clients`). ``kds`` / ``pcs``
    are collateral sources the verifier may fetch AMD CRLs / Intel collateral from.
    """
    from .openai_clients import AttestedOpenAI, check_api_key

    check_api_key(api_key)
    http_client = AttestedClient(_origin_url(base_url), policy=policy, verdict_ttl=verdict_ttl, verify_fn=verify_fn,
                                 kds=kds, pcs=pcs)
    return AttestedOpenAI(base_url=base_url, api_key=api_key, http_client=http_client, **openai_kwargs)


def async_openai_client(base_url: str, api_key: str, policy: Policy, *, verdict_ttl: float = DEFAULT_VERDICT_TTL,
                        verify_fn: VerifyFn | None = None, kds: Any = None, pcs: Any = None,
                        **openai_kwargs: Any) -> Any:
    """``openai.AsyncOpenAI`` over an :class:`AsyncAttestedClient` (WebSocket features refused likewise)."""
    from .openai_clients import AsyncAttestedOpenAI, check_api_key

    check_api_key(api_key)
    http_client = AsyncAttestedClient(_origin_url(base_url), policy=policy, verdict_ttl=verdict_ttl,
                                      verify_fn=verify_fn, kds=kds, pcs=pcs)
    return AsyncAttestedOpenAI(base_url=base_url, api_key=api_key, http_client=http_client, **openai_kwargs)
