"""PostgreSQL over TLS with a pinned server certificate, against a real PostgreSQL started here with ssl=on.

A throw-away cluster (initdb + pg_ctl as the postgres user, as ./dev does) serves a self-signed certificate made
with cryptography. The pinned certificate (or its key) connects and the store opens; a certificate for the same
hostname with another key is refused before any query; the test PostgreSQL of ./dev (no TLS) is refused too.
"""

from __future__ import annotations

import asyncio
import glob
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from enclave.config import ConfigError, check_database_transport
from enclave.database_tls import certificate_sha256, pinned_client_context, spki_sha256_of_certificate
from enclave.store import Store, open_store
from tests.enclave.conftest import ROW_KEY, make_settings

HOSTNAME = "db.cube.test"


def _certificate(hostname: str = HOSTNAME) -> tuple[bytes, bytes]:
    """(certificate DER, key PEM) of a self-signed P-256 server certificate for ``hostname``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.now(timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
            .sign(key, hashes.SHA256()))
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.DER), pem


def _pg_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: [int(x) for x in Path(p).parent.name.split(".")
                                                                             if x.isdigit()])
    if not found:
        pytest.fail("PostgreSQL server binaries not found: run the suite with ./dev test (it installs postgresql)")
    return Path(found[-1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tls_postgres() -> Iterator[tuple[str, bytes, Path]]:
    """(asyncpg URL, server certificate DER, server log) of a PostgreSQL serving TLS only, on 127.0.0.1."""
    assert os.geteuid() == 0 and shutil.which("runuser"), "the PostgreSQL server refuses root: needs runuser"
    bin_dir = _pg_bin()
    base = Path(tempfile.mkdtemp(prefix="cubepgtls"))
    der, key_pem = _certificate()
    (base / "server.crt").write_bytes(ssl.DER_cert_to_PEM_cert(der).encode())
    (base / "server.key").write_bytes(key_pem)
    os.chmod(base / "server.key", 0o600)
    shutil.chown(base, "postgres")
    for name in ("server.crt", "server.key"):
        shutil.chown(base / name, "postgres")
    run = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    data = base / "data"
    subprocess.run([*run, str(bin_dir / "initdb"), "-D", str(data), "-U", "cube", "--auth=trust"], check=True,
                   capture_output=True)
    # hostssl only: a client that does not ask for TLS is turned away by the server as well.
    (data / "pg_hba.conf").write_text("local all all trust\nhostssl all all 127.0.0.1/32 trust\n")
    options = (f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off -c ssl=on "
               f"-c ssl_cert_file={base / 'server.crt'} -c ssl_key_file={base / 'server.key'} -c log_connections=on")
    subprocess.run([*run, str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(base / "log"), "-w", "-o", options,
                    "start"], check=True, capture_output=True)
    try:
        subprocess.run([*run, str(bin_dir / "createdb"), "-h", str(base), "-p", str(port), "-U", "cube", "cube_tls"],
                       check=True, capture_output=True)
        yield f"postgresql+asyncpg://cube@127.0.0.1:{port}/cube_tls", der, base / "log"
    finally:
        subprocess.run([*run, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


async def _count_users(url: str, tls: ssl.SSLContext) -> int:
    store = await Store.open(url, row_key=ROW_KEY, tls=tls)
    try:
        return await store.count_users()
    finally:
        await store.close()


def test_the_pinned_certificate_or_key_connects(tls_postgres) -> None:
    url, der, _ = tls_postgres
    assert asyncio.run(_count_users(url, pinned_client_context(certificate_sha256_hex=certificate_sha256(der)))) == 0
    by_key = pinned_client_context(spki_sha256_hex=spki_sha256_of_certificate(der).upper())
    assert asyncio.run(_count_users(url, by_key)) == 0


def test_a_certificate_with_another_key_is_refused(tls_postgres) -> None:
    url, der, log = tls_postgres
    other, _ = _certificate(HOSTNAME)  # same name, another key: what a host answering as the database shows
    assert certificate_sha256(other) != certificate_sha256(der)
    authorized = log.read_text().count("connection authorized")
    for ctx in (pinned_client_context(certificate_sha256_hex=certificate_sha256(other)),
                pinned_client_context(spki_sha256_hex=spki_sha256_of_certificate(other))):
        with pytest.raises(ssl.SSLCertVerificationError, match="not the pinned one"):
            asyncio.run(_count_users(url, ctx))
    # A URL asking for no TLS does not undo the pin (connect arguments win over the URL's query).
    with pytest.raises(ssl.SSLCertVerificationError, match="not the pinned one"):
        asyncio.run(_count_users(url + "?ssl=disable", pinned_client_context(
            certificate_sha256_hex=certificate_sha256(other))))
    # Refused inside the handshake: the server never got as far as a startup message (user, database).
    assert log.read_text().count("connection authorized") == authorized
    assert "connection received" in log.read_text()


def test_a_server_without_tls_is_refused(postgres_url: str, tls_postgres) -> None:
    _, der, _ = tls_postgres  # ./dev's PostgreSQL speaks no TLS: asking for it with a pin must not fall back
    ctx = pinned_client_context(certificate_sha256_hex=certificate_sha256(der))
    with pytest.raises(ConnectionError, match="SSL"):
        asyncio.run(_count_users(postgres_url, ctx))


def test_settings_carry_the_pin_to_the_store(tmp_path: Path, tls_postgres) -> None:
    url, der, _ = tls_postgres
    pin = ":".join(f"{b:02X}" for b in bytes.fromhex(certificate_sha256(der)))  # as openssl x509 -fingerprint
    settings = make_settings(tmp_path, database_url=url, database_tls={"server_certificate_sha256": pin})
    assert settings.database_tls is not None and settings.database_tls.server_certificate_sha256 == \
        certificate_sha256(der)

    async def opened() -> int:
        store = await open_store(settings, ROW_KEY)
        try:
            return await store.count_users()
        finally:
            await store.close()

    assert asyncio.run(opened()) == 0
    wrong = make_settings(tmp_path / "w", database_url=url,
                          database_tls={"server_spki_sha256": spki_sha256_of_certificate(_certificate()[0])})
    with pytest.raises(ssl.SSLCertVerificationError):
        asyncio.run(open_store(wrong, ROW_KEY))


def test_postgres_without_pinned_tls_is_refused_outside_simulation(tmp_path: Path) -> None:
    url = "postgresql+asyncpg://cube@10.0.0.5/cube"
    real = {"simulate": False, "server_secret": None}   # make_settings simulates unless told otherwise
    with pytest.raises(ConfigError, match="needs database_tls"):
        check_database_transport(make_settings(tmp_path, database_url=url, **real))
    check_database_transport(make_settings(tmp_path, database_url=url, simulate=True))
    check_database_transport(make_settings(tmp_path, database_url=url, **real,
                                           database_tls={"server_spki_sha256": "ab" * 32}))
    check_database_transport(make_settings(tmp_path, **real))  # SQLite in data_dir
    with pytest.raises(ConfigError, match="exactly one"):
        make_settings(tmp_path, database_url=url, database_tls={})
    with pytest.raises(ConfigError, match="64 digits"):
        make_settings(tmp_path, database_url=url, database_tls={"server_spki_sha256": "abc"})
    with pytest.raises(ConfigError, match="only for a postgresql"):
        make_settings(tmp_path, database_tls={"server_spki_sha256": "ab" * 32})


def test_cube_enclave_serve_refuses_plain_postgres(tmp_path: Path, capsys) -> None:
    from enclave.main import main

    config = tmp_path / "enclave.yaml"
    config.write_text("database_url: postgresql+asyncpg://cube@10.0.0.5/cube\n")
    assert main(["serve", "--config", str(config), "--data-dir", str(tmp_path / "data")]) == 2
    assert "needs database_tls" in capsys.readouterr().err


def test_a_url_that_would_skip_tls_is_refused_with_a_pin(tls_postgres) -> None:
    """asyncpg never uses TLS on a Unix socket, and one it picks itself when the URL has no host (PGHOST, then
    /run/postgresql, /tmp...): with a pin, such a URL would connect to whatever listens there without the pin.
    Here the server's own socket (``local ... trust``) is reachable: refused before any connection."""
    from enclave.store import StoreError

    url, _, log = tls_postgres
    other = pinned_client_context(certificate_sha256_hex=certificate_sha256(_certificate()[0]))
    port = url.rsplit(":", 1)[1].split("/")[0]
    socket_dir = log.parent
    for skipping in (f"{url}?host={socket_dir}", f"postgresql+asyncpg://cube@/cube_tls?host={socket_dir}&port={port}",
                     f"postgresql+asyncpg://cube@/cube_tls?port={port}"):
        with pytest.raises(StoreError, match="TCP host"):
            asyncio.run(_count_users(skipping, other))
    # sslmode in the URL does not weaken the pin either (the connect argument's context wins)
    for mode in ("disable", "prefer", "allow"):
        with pytest.raises((ssl.SSLCertVerificationError, TypeError, StoreError)):
            asyncio.run(_count_users(f"{url}?sslmode={mode}", other))


def test_the_pinned_context_refuses_renegotiation() -> None:
    """The pin is checked in the first handshake only: a TLS 1.2 renegotiation could bring another certificate."""
    ctx = pinned_client_context(spki_sha256_hex="ab" * 32)
    assert ctx.options & ssl.OP_NO_RENEGOTIATION and ctx.minimum_version >= ssl.TLSVersion.TLSv1_2


def test_every_pooled_connection_is_pinned(tls_postgres) -> None:
    """The pin lives in the context every new pool connection handshakes with: two connections open at once
    make two pinned handshakes (a pool reusing an unpinned socket, or pinning the first only, would show fewer)."""
    from sqlalchemy import text

    url, der, _ = tls_postgres
    ctx = pinned_client_context(certificate_sha256_hex=certificate_sha256(der))
    pinned = ctx.sslobject_class
    handshakes: list[bytes] = []

    class Counting(pinned):  # type: ignore[misc, valid-type]
        def do_handshake(self) -> None:
            super().do_handshake()   # the pin check raises here on a mismatch
            handshakes.append(self.getpeercert(binary_form=True))

    ctx.sslobject_class = Counting

    async def two_at_once() -> None:
        store = await Store.open(url, row_key=ROW_KEY, tls=ctx, migrate=False)
        try:
            async with store.engine.connect() as one, store.engine.connect() as two:
                assert (await one.execute(text("select 1"))).scalar() == 1
                assert (await two.execute(text("select 1"))).scalar() == 1
        finally:
            await store.close()

    asyncio.run(two_at_once())
    assert len(handshakes) >= 2 and set(handshakes) == {der}
