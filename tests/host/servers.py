"""Small real-socket servers on 127.0.0.1 standing in for the enclave in relay tests."""

from __future__ import annotations

import socket
import ssl
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

LOOPBACK = "127.0.0.1"


class ThreadedServer:
    """Accepts on 127.0.0.1 and runs ``handler(conn)`` per connection in a daemon thread."""

    def __init__(self, handler: Callable[[socket.socket], None], *, backlog: int = 64, port: int = 0) -> None:
        self.handler = handler
        self.sock = socket.create_server((LOOPBACK, port), backlog=backlog)
        self.port: int = self.sock.getsockname()[1]
        self.connections: list[socket.socket] = []
        self.errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections.append(conn)
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        try:
            self.handler(conn)
        except BaseException as exc:  # recorded for assertions; a test server must not die silently
            self.errors.append(exc)
        finally:
            conn.close()

    def close(self) -> None:
        self.sock.close()
        for conn in self.connections:
            try:
                conn.close()
            except OSError:
                pass


def echo(conn: socket.socket) -> None:
    """Echo until EOF, then half-close our side."""
    while True:
        data = conn.recv(1 << 16)
        if not data:
            break
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)


def recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        data = sock.recv(1 << 16)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def self_signed(tmp: Path, hostname: str = "enclave.test") -> tuple[Path, Path]:
    """A throw-away P-256 certificate for the TLS stand-in (cert path, key path)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.now(timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class TamperingProxy(ThreadedServer):
    """A lying hop: forwards to ``target_port`` but flips one bit of the byte at ``offset`` of the
    server -> client stream (0-based), as a malicious relay would."""

    def __init__(self, target_port: int, offset: int) -> None:
        self.target_port = target_port
        self.offset = offset
        self.flipped = threading.Event()
        super().__init__(self._relay)

    def _relay(self, client: socket.socket) -> None:
        upstream = socket.create_connection((LOOPBACK, self.target_port))

        def up() -> None:
            try:
                while data := client.recv(1 << 16):
                    upstream.sendall(data)
                upstream.shutdown(socket.SHUT_WR)
            except OSError:
                pass

        t = threading.Thread(target=up, daemon=True)
        t.start()
        seen = 0
        try:
            while data := upstream.recv(1 << 16):
                if seen <= self.offset < seen + len(data):
                    buf = bytearray(data)
                    buf[self.offset - seen] ^= 0x01
                    data = bytes(buf)
                    self.flipped.set()
                seen += len(data)
                client.sendall(data)
            client.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            t.join(5)
            upstream.close()


def tls_server_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cert, key)
    return ctx
