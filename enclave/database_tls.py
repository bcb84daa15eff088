"""TLS to PostgreSQL with the server's certificate (or its key) pinned by SHA-256.

The host owns the network between an enclave and a PostgreSQL server, so the connection must be TLS and the
server must be the one the (measured) configuration names. Python's ``ssl`` has no hook for a pin, and asyncpg
sends its startup message right after the handshake, so the pin is checked *inside* the handshake: the context's
``sslobject_class`` (the object asyncio's TLS layer drives, asyncpg's ``start_tls`` included) completes
OpenSSL's handshake, then compares the SHA-256 of the peer certificate's DER (or of its SubjectPublicKeyInfo)
with the pin, in constant time, and raises ``ssl.SSLCertVerificationError`` when it differs. asyncio reports a
handshake that raised as failed, so not one byte of the PostgreSQL protocol (user name, queries) is sent to a
server that does not hold the pinned key.

Chain validation is off (a self-signed server certificate is the usual case; the pin is the trust anchor):
OpenSSL still checks the server's handshake signature against the certificate's key, so a server presenting
the pinned certificate without its private key fails the handshake itself.
"""

from __future__ import annotations

import hashlib
import hmac
import ssl
from typing import Callable

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

PinCheck = Callable[[bytes | None], None]


def certificate_sha256(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def spki_sha256_of_certificate(der: bytes) -> str:
    key = x509.load_der_x509_certificate(der).public_key()
    return hashlib.sha256(key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)).hexdigest()


def _pin_check(*, certificate_sha256_hex: str | None, spki_sha256_hex: str | None) -> PinCheck:
    if (certificate_sha256_hex is None) == (spki_sha256_hex is None):
        raise ValueError("pin exactly one of the server certificate's SHA-256 or its SPKI's SHA-256")

    def check(der: bytes | None) -> None:
        if not der:
            raise ssl.SSLCertVerificationError("the database server presented no certificate")
        if certificate_sha256_hex is not None:
            seen, wanted, what = certificate_sha256(der), certificate_sha256_hex, "certificate"
        else:
            try:
                seen = spki_sha256_of_certificate(der)
            except ValueError:
                raise ssl.SSLCertVerificationError("the database server's certificate does not parse") from None
            wanted, what = spki_sha256_hex or "", "public key"
        if not hmac.compare_digest(seen, wanted.lower()):
            raise ssl.SSLCertVerificationError(
                f"the database server's {what} (SHA-256 {seen}) is not the pinned one (database_tls)")

    return check


def _pinned_object_class(check: PinCheck) -> type[ssl.SSLObject]:
    class PinnedSSLObject(ssl.SSLObject):
        """An SSLObject whose handshake completes only with the pinned peer certificate."""

        def do_handshake(self) -> None:
            super().do_handshake()
            check(self.getpeercert(binary_form=True))

    return PinnedSSLObject


def _pinned_socket_class(check: PinCheck) -> type[ssl.SSLSocket]:
    class PinnedSSLSocket(ssl.SSLSocket):
        """The same for a blocking ``wrap_socket`` (unused by asyncpg; set so no path skips the pin)."""

        def do_handshake(self, block: bool = False) -> None:
            super().do_handshake(block)
            check(self.getpeercert(binary_form=True))

    return PinnedSSLSocket


def pinned_client_context(*, certificate_sha256_hex: str | None = None,
                          spki_sha256_hex: str | None = None) -> ssl.SSLContext:
    """A client SSLContext (TLS 1.2+) whose handshakes succeed only with the pinned server certificate or key."""
    check = _pin_check(certificate_sha256_hex=certificate_sha256_hex, spki_sha256_hex=spki_sha256_hex)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the pin, checked in the handshake, replaces chain validation
    # The pin is checked once, in the first handshake: a TLS 1.2 renegotiation (which could bring another
    # certificate) must not happen on such a connection.
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    ctx.sslobject_class = _pinned_object_class(check)
    ctx.sslsocket_class = _pinned_socket_class(check)
    return ctx
