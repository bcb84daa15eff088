"""A 'publicly trusted' man in the middle for tests: a TLS server whose certificate chains to a CA the process trusts.

The host serves the enclave's address, so it can get a WebPKI certificate for the name from an ACME CA;
here a throw-away CA stands in, made trusted through ``SSL_CERT_FILE`` (what ``ssl.create_default_context``
and so ``websockets`` read). The server records every byte it decrypts and every TCP connection it accepts.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .listener import LoopbackListener


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(workdir: Path) -> tuple[Path, Path]:
    """A CA (its PEM, to trust) and a leaf for 127.0.0.1/localhost signed by it (cert+key PEM, to serve)."""
    now = datetime.now(timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder().subject_name(_name("Test Public CA")).issuer_name(_name("Test Public CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder().subject_name(_name("127.0.0.1")).issuer_name(ca.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_pem, served = workdir / "public-ca.pem", workdir / "public-leaf.pem"  # a test adversary's key
    ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    served.write_bytes(leaf.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return ca_pem, served


class TrustedMitm(LoopbackListener):
    """Accepts TLS as ``127.0.0.1`` with a certificate the process trusts; records what clients send."""

    def __init__(self, workdir: Path) -> None:
        self.ca_file, served = _issue(workdir)
        self._ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._ctx.load_cert_chain(served)
        super().__init__()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        try:
            with self._ctx.wrap_socket(conn, server_side=True) as tls:
                with self._lock:
                    self.handshakes += 1
                while b"\r\n\r\n" not in self.recorded and (data := tls.recv(65536)):
                    with self._lock:
                        self.recorded += data
                tls.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        except (OSError, ssl.SSLError):
            pass
        finally:
            conn.close()
