"""A TLS-terminating man in the middle for tests: its own key, the real enclave's evidence copied.

It accepts TLS with a self-signed certificate for a key of its own that carries, bit for bit, the
id-pe-cmw extension of the genuine enclave certificate, opens its own TLS connection to the
enclave, forwards bytes both ways and records every byte it decrypts from the client.
"""

from __future__ import annotations

import socket
import ssl
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from attestation.atls.certificate import ID_PE_CMW

from .listener import LoopbackListener


class Mitm(LoopbackListener):
    def __init__(self, genuine_cert: x509.Certificate, upstream_port: int, workdir: Path, *, port: int = 0) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        copied = genuine_cert.extensions.get_extension_for_oid(ID_PE_CMW)
        name = genuine_cert.subject
        now = datetime.now(timezone.utc)
        cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(copied.value, critical=copied.critical)
            .sign(key, hashes.SHA256())
        )
        assert cert.extensions.get_extension_for_oid(ID_PE_CMW).value.value == copied.value.value
        pem = workdir / "mitm.pem"  # a test adversary's key: on disk is fine
        pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        self.server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.server_ctx.load_cert_chain(pem)
        self.upstream_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.upstream_ctx.check_hostname = False
        self.upstream_ctx.verify_mode = ssl.CERT_NONE  # the adversary does not care
        self.upstream_port = upstream_port
        super().__init__(port=port)

    def _serve(self, conn: socket.socket) -> None:
        try:
            client = self.server_ctx.wrap_socket(conn, server_side=True)
        except (OSError, ssl.SSLError):
            conn.close()
            return
        with self._lock:
            self.handshakes += 1
        try:
            upstream = self.upstream_ctx.wrap_socket(socket.create_connection(("127.0.0.1", self.upstream_port)))
        except OSError:
            client.close()
            return
        back = threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True)
        back.start()
        self._pump(client, upstream, True)
        back.join(timeout=5)

    def _pump(self, src: ssl.SSLSocket, dst: ssl.SSLSocket, record: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if record:
                    with self._lock:
                        self.recorded += data
                dst.sendall(data)
        except (OSError, ssl.SSLError):
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)  # unblocks the other pump's recv
                except OSError:
                    pass
                try:
                    s.close()
                except OSError:
                    pass
