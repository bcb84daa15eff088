"""The enclave's attested TLS identity: an in-memory key, a certificate carrying evidence, rotation.

How rotation keeps open connections: uvicorn gets one *dispatch* SSLContext whose ``sni_callback``
runs at the start of every handshake (OpenSSL calls it with ``server_name=None`` when a client sends
no SNI, e.g. when it connects to an IP address) and switches that connection's ``SSLObject.context``
to the per-key context of the current key.  An established connection keeps the context (and so
the key) it was handshaken with; only new handshakes see a rotated key.  The dispatch context holds
no certificate itself, so a handshake that somehow skipped the callback fails instead of being
served by a stale key.

Key material never touches a disk: ``SSLContext.load_cert_chain`` only reads from a path, so the
PEM is handed to OpenSSL through an anonymous in-memory file (``memfd_create``) that is closed
right after loading.

To know which key served the connection a request arrived on, :func:`attested_protocol_class`
wraps uvicorn's HTTP protocol: when a TLS connection is made it stores that connection's
``KeyMaterial`` in the per-connection copy of the ASGI ``state``, which uvicorn copies into every
request scope (``request.state.cube_ai_tls_key``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import secrets
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from attestation.atls.binding import (
    NONCE_SIZE,
    binding_parameters,
    report_data_for,
    spki_der_of,
    spki_sha256,
)
from attestation.atls.certificate import make_attested_certificate
from attestation.errors import ProviderError
from attestation.evidence import Evidence, encode_cmw
from attestation.providers import EvidenceProvider

log = logging.getLogger("enclave.tls")

STATE_KEY = "cube_ai_tls_key"  # name in the ASGI scope "state" of the KeyMaterial serving the connection
CONNECTION_KEY = "cube_ai_connection"  # name in the ASGI scope "state" of the connection's unique number
DEFAULT_CERT_LIFETIME = timedelta(days=7)


@dataclass(frozen=True, eq=False)
class KeyMaterial:
    """One generation of the enclave's TLS identity.  The private key lives only inside ``context``."""

    generation: int
    spki_der: bytes
    spki_sha256: str
    certificate: x509.Certificate
    evidence: Evidence  # the evidence in the certificate (bound with ``cert_nonce``)
    cert_nonce: bytes
    context: ssl.SSLContext
    created_at: float


class _KeyContext(ssl.SSLContext):
    """A server SSLContext that knows which KeyMaterial it serves."""

    cube_key: KeyMaterial | None = None


def _base_server_context(cls: type[ssl.SSLContext] = ssl.SSLContext) -> ssl.SSLContext:
    ctx = cls(ssl.PROTOCOL_TLS_SERVER)
    # No resumption: a resumed session skips the Certificate message, and every connection must
    # show its attested certificate to the client (after a rotation a resumed session would carry
    # the old certificate while the connection is attributed to the new key).  TLS 1.2 resumes by
    # session id from OpenSSL's server cache, which Python cannot switch off (and Python gives every
    # context the same session id context), so TLS 1.3 only, where resumption needs a ticket.
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.options |= ssl.OP_NO_TICKET
    ctx.num_tickets = 0
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _load_in_memory(ctx: ssl.SSLContext, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
    pem = cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.memfd_create("cube-ai-tls", os.MFD_CLOEXEC)
    try:
        os.write(fd, pem)
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


class TlsManager:
    """Owns the TLS key, its attested certificate, rotation, and evidence for client nonces."""

    def __init__(
        self,
        provider: EvidenceProvider,
        *,
        hostnames: Sequence[str],
        rotate_every: float | None,
        cert_lifetime: timedelta = DEFAULT_CERT_LIFETIME,
        curve: ec.EllipticCurve | None = None,
        on_rotate: Callable[[KeyMaterial], None] | None = None,
    ) -> None:
        if rotate_every is not None and rotate_every <= 0:
            raise ValueError("rotate_every must be positive seconds or None")
        self._provider = provider
        self._hostnames = tuple(hostnames)
        self._rotate_every = rotate_every
        self._cert_lifetime = cert_lifetime
        self._curve = curve or ec.SECP256R1()
        self._on_rotate = on_rotate
        self._provider_lock = threading.Lock()  # one evidence request at a time reaches the device
        self._state_lock = threading.Lock()
        self._current: KeyMaterial | None = None
        self._generation = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._dispatch = _base_server_context()
        self._dispatch.sni_callback = self._select_context

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Create the first key (synchronously, so a failure stops the enclave) and start rotation."""
        if self._current is None:
            self.rotate()
        if self._rotate_every is not None and self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._rotation_loop, name="tls-rotation", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=10)

    def _rotation_loop(self) -> None:
        assert self._rotate_every is not None
        while not self._stop.wait(self._rotate_every):
            try:
                self.rotate()
            except Exception:  # keep serving the previous key; try again next period
                log.exception("TLS key rotation failed; keeping the current key")

    # -- keys ------------------------------------------------------------------------------------
    def rotate(self) -> KeyMaterial:
        """Make a new key + attested certificate and serve it to new handshakes."""
        key = ec.generate_private_key(self._curve)
        spki = spki_der_of(key)
        cert_nonce = secrets.token_bytes(NONCE_SIZE)
        evidence = self._evidence(spki, cert_nonce)
        cert = make_attested_certificate(
            key, encode_cmw(evidence), self._hostnames, datetime.now(timezone.utc) + self._cert_lifetime
        )
        ctx = _base_server_context(_KeyContext)
        _load_in_memory(ctx, key, cert)
        del key
        with self._state_lock:
            self._generation += 1
            material = KeyMaterial(
                generation=self._generation,
                spki_der=spki,
                spki_sha256=spki_sha256(spki),
                certificate=cert,
                evidence=evidence,
                cert_nonce=cert_nonce,
                context=ctx,
                created_at=time.time(),
            )
            ctx.cube_key = material  # type: ignore[attr-defined]
            self._current = material
        log.info("TLS key generation %d in service (spki sha256 %s)", material.generation, material.spki_sha256)
        if self._on_rotate is not None:
            try:
                self._on_rotate(material)
            except Exception:  # a failing observer must not take the new key out of service
                log.exception("on_rotate callback failed")
        return material

    @property
    def current(self) -> KeyMaterial:
        material = self._current
        if material is None:
            raise RuntimeError("TlsManager.start() has not been called")
        return material

    def current_certificate_pem(self) -> bytes:
        """PEM of the certificate new handshakes get (e.g. for a banner; it changes on rotation)."""
        return self.current.certificate.public_bytes(serialization.Encoding.PEM)

    def server_context(self) -> ssl.SSLContext:
        """The SSLContext to give uvicorn; every new handshake is served by the current key."""
        return self._dispatch

    def _select_context(self, ssl_object: Any, server_name: str | None, _ctx: ssl.SSLContext) -> None:
        material = self._current
        if material is None:
            return None  # no certificate anywhere: the handshake fails (fail closed)
        ssl_object.context = material.context
        return None

    # -- evidence --------------------------------------------------------------------------------
    def _evidence(self, spki_der: bytes, nonce: bytes) -> Evidence:
        report_data = report_data_for(spki_der, nonce)
        with self._provider_lock:
            evidence = self._provider.get_evidence(report_data)
        if not isinstance(evidence, Evidence):
            raise ProviderError("evidence provider returned something that is not Evidence")
        return dataclasses.replace(evidence, binding=binding_parameters(nonce))

    def evidence_for_nonce(self, nonce: bytes) -> Evidence:
        """Fresh evidence bound to the current key and ``nonce`` (32 bytes)."""
        return self.evidence_for_key(self.current, nonce)

    def evidence_for_key(self, material: KeyMaterial, nonce: bytes) -> Evidence:
        """Fresh evidence bound to ``material``'s key (e.g. the key of one connection) and ``nonce``."""
        if len(nonce) != NONCE_SIZE:
            raise ValueError(f"nonce must be exactly {NONCE_SIZE} bytes")
        return self._evidence(material.spki_der, nonce)


def key_for_ssl_object(ssl_object: Any) -> KeyMaterial | None:
    """The KeyMaterial that served a connection, from its SSLObject/SSLSocket (None if not ours)."""
    if ssl_object is None:
        return None
    return getattr(ssl_object.context, "cube_key", None)


_connection_numbers = itertools.count(1)


def attested_protocol_class(base: type[asyncio.Protocol] | str = "auto") -> type[asyncio.Protocol]:
    """A uvicorn HTTP protocol class that exposes the connection's KeyMaterial to requests."""
    if isinstance(base, str):
        from uvicorn.config import HTTP_PROTOCOLS
        from uvicorn.importer import import_from_string

        base = import_from_string(HTTP_PROTOCOLS.get(base, base))
    base_cls: Any = base

    class AttestedConnectionProtocol(base_cls):  # type: ignore[misc, valid-type]
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            material = key_for_ssl_object(transport.get_extra_info("ssl_object"))
            if material is not None:
                # per-connection copy; uvicorn copies app_state into each request's scope["state"]
                self.app_state = {**self.app_state, STATE_KEY: material, CONNECTION_KEY: next(_connection_numbers)}

    AttestedConnectionProtocol.__name__ = f"Attested{base_cls.__name__}"
    return AttestedConnectionProtocol


def uvicorn_config(tls: TlsManager, app: Any, *, host: str, port: int, http: Any = "auto", **kwargs: Any) -> Any:
    """A uvicorn.Config serving ``app`` over the manager's attested TLS (call ``tls.start()`` first)."""
    import uvicorn

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=attested_protocol_class(http),
        ssl_context_factory=lambda _config, _default: tls.server_context(),
        **kwargs,
    )
