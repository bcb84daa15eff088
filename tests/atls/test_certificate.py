"""The binding rule and the id-pe-cmw certificate extension."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import socket
import ssl
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from attestation.atls.binding import ATLS_LABEL, binding_parameters, nonce_from_binding, report_data_for, spki_der_of
from attestation.atls.certificate import (
    ID_PE_CMW,
    cmw_extension_value,
    evidence_from_certificate,
    make_attested_certificate,
    parse_cmw_extension_value,
)
from attestation.atls.client import AttestedClient, AttestedTLSError, Attestor, _cached_spki
from attestation.errors import EvidenceError, ParseError
from attestation.evidence import Evidence, decode_cmw, encode_cmw
from attestation.x509parse import load_der_certificate

from .conftest import PAT, bind_loopback

LATER = datetime.now(timezone.utc) + timedelta(days=1)


def test_report_data_rule_is_exact():
    spki, nonce = b"\x30\x59" + bytes(89), bytes(range(32))
    expected = hashlib.sha512(b"cube-ai/atls/v1" + hashlib.sha256(spki).digest() + nonce).digest()
    assert ATLS_LABEL == b"cube-ai/atls/v1"
    assert report_data_for(spki, nonce) == expected and len(expected) == 64
    assert report_data_for(spki, bytes(32)) != expected
    for bad in (b"", bytes(31), bytes(33)):
        with pytest.raises(ValueError):
            report_data_for(spki, bad)


def test_binding_parameters_round_trip_and_are_strict():
    nonce = os.urandom(32)
    assert nonce_from_binding(binding_parameters(nonce)) == nonce
    for bad in ({}, {"scheme": "other", "nonce": nonce}, {"scheme": "cube-ai/atls/v1", "nonce": nonce[:31]},
                {"scheme": "cube-ai/atls/v1", "nonce": nonce.hex()}):
        with pytest.raises(EvidenceError):
            nonce_from_binding(bad)


def sample_cmw() -> bytes:
    return encode_cmw(Evidence(platform="sim", report=b"\x01" * 100, binding=binding_parameters(bytes(32))))


@pytest.mark.parametrize("curve", [ec.SECP256R1(), ec.SECP384R1()], ids=["P-256", "P-384"])
def test_certificate_carries_the_evidence_non_critically(curve):
    key = ec.generate_private_key(curve)
    cmw = sample_cmw()
    cert = make_attested_certificate(key, cmw, ["localhost", "127.0.0.1"], LATER)
    reparsed = x509.load_der_x509_certificate(cert.public_bytes(serialization.Encoding.DER))
    ext = reparsed.extensions.get_extension_for_oid(ID_PE_CMW)
    assert ext.critical is False
    assert ext.value.value[0] == 0x04  # CMW CHOICE, cbor alternative: OCTET STRING
    assert evidence_from_certificate(reparsed) == cmw
    assert decode_cmw(evidence_from_certificate(reparsed)).binding["nonce"] == bytes(32)
    assert spki_der_of(reparsed) == spki_der_of(key)
    sans = reparsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert reparsed.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False


def test_der_octet_string_lengths_round_trip():
    for size in (1, 127, 128, 255, 256, 65535, 70000):
        blob = os.urandom(size)
        assert parse_cmw_extension_value(cmw_extension_value(blob)) == blob


@pytest.mark.parametrize("value", [
    b"",
    b"\x04",
    b"\x0c\x03abc",               # the JSON alternative
    b"\x30\x03\x04\x01\x00",      # a SEQUENCE
    b"\x04\x05abc",               # truncated
    b"\x04\x02abc",               # trailing byte
    b"\x04\x81\x03abc",           # non-minimal length
    b"\x04\x00",                  # empty
    b"\x04\x85\x01\x00\x00\x00\x00",  # absurd length
], ids=["empty", "tag-only", "json", "sequence", "truncated", "trailing", "non-minimal", "zero", "huge"])
def test_malformed_extension_values_are_refused(value):
    with pytest.raises(EvidenceError):
        parse_cmw_extension_value(value)


def plain_certificate(*extensions: tuple[x509.ExtensionType, bool]) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
               .serial_number(1).not_valid_before(datetime.now(timezone.utc)).not_valid_after(LATER))
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical=critical)
    return builder.sign(key, hashes.SHA256())


def test_extraction_is_strict():
    with pytest.raises(EvidenceError, match="no id-pe-cmw"):
        evidence_from_certificate(plain_certificate())
    good = x509.UnrecognizedExtension(ID_PE_CMW, cmw_extension_value(sample_cmw()))
    with pytest.raises(EvidenceError, match="critical"):
        evidence_from_certificate(plain_certificate((good, True)))
    with pytest.raises(EvidenceError):
        evidence_from_certificate(plain_certificate((x509.UnrecognizedExtension(ID_PE_CMW, b"\x0c\x01x"), False)))
    assert evidence_from_certificate(plain_certificate((good, False))) == sample_cmw()


def test_only_ecdsa_keys():
    from cryptography.hazmat.primitives.asymmetric import ed25519

    with pytest.raises(TypeError):
        make_attested_certificate(ed25519.Ed25519PrivateKey.generate(), sample_cmw(), [], LATER)


# -- damaged peer certificates: only library errors, and nothing sent ------------------------------
def _attested_der(cmw: bytes | None = None, key: ec.EllipticCurvePrivateKey | None = None) -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    cert = make_attested_certificate(key, cmw or sample_cmw(), ["localhost", "127.0.0.1"], LATER)
    return cert.public_bytes(serialization.Encoding.DER)


def damage_san(der: bytes) -> bytes:
    """The dNSName in the SAN retagged as an x400Address ([3] constructed): cryptography cannot decode it."""
    at = der.index(b"\x82\x09localhost")
    return der[:at] + b"\xa3" + der[at + 1:]


def damage_version(der: bytes) -> bytes:
    """TBSCertificate version INTEGER 2 (v3) changed to 5: cryptography refuses it at load time."""
    at = der.index(b"\xa0\x03\x02\x01\x02")
    return der[:at + 4] + b"\x05" + der[at + 5:]


def test_damaged_san_is_an_evidence_error_not_a_cryptography_exception():
    damaged = x509.load_der_x509_certificate(damage_san(_attested_der()))  # loads: extensions are lazy
    with pytest.raises(x509.UnsupportedGeneralNameType):
        damaged.extensions  # what used to escape
    with pytest.raises(EvidenceError, match="UnsupportedGeneralNameType"):
        evidence_from_certificate(damaged)
    with pytest.raises(ParseError, match="server certificate is damaged"):
        load_der_certificate(damage_san(_attested_der()), "server certificate")


def test_damaged_version_is_a_parse_error():
    with pytest.raises(x509.InvalidVersion):
        x509.load_der_x509_certificate(damage_version(_attested_der()))  # what used to escape
    with pytest.raises(ParseError, match="InvalidVersion"):
        load_der_certificate(damage_version(_attested_der()), "server certificate")


@pytest.mark.parametrize("damage", [damage_san, damage_version], ids=["san", "version"])
def test_client_refuses_a_damaged_server_certificate_at_the_certificate_step(damage, sim_policy):
    attestor = Attestor("https://127.0.0.1:1", sim_policy)
    der = damage(_attested_der())
    assert _cached_spki(attestor, der, False) is None  # fast path: no exception, falls through
    report = attestor.new_report()
    with pytest.raises(AttestedTLSError) as info:
        attestor.certificate_facts(report, der)
    assert [(s.name, s.ok) for s in info.value.report.steps] == [("certificate", False)]
    assert "server certificate" in info.value.report.error


class _RecordingTlsServer:
    """A TLS server on 127.0.0.1 presenting a given certificate DER; records every decrypted byte."""

    def __init__(self, cert_der: bytes, key: ec.EllipticCurvePrivateKey, workdir) -> None:
        import base64
        import threading

        pem = workdir / "server.pem"  # a throw-away test key
        pem.write_bytes(b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(cert_der)
                        + b"-----END CERTIFICATE-----\n" + key.private_bytes(
                            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()))
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(pem)  # OpenSSL accepts both damages: it decodes lazily too
        self.listener = bind_loopback()
        self.port = self.listener.getsockname()[1]
        self.handshakes = 0
        self.recorded = bytearray()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            conn.settimeout(5)
            try:
                with self.ctx.wrap_socket(conn, server_side=True) as tls:
                    self.handshakes += 1
                    while data := tls.recv(65536):
                        self.recorded += data
            except (OSError, ssl.SSLError):
                pass

    def close(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone does not
        except OSError:
            pass
        self.listener.close()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()


@pytest.mark.parametrize("damage", [damage_san, damage_version], ids=["san", "version"])
def test_damaged_genuine_certificate_over_tls_sends_nothing(damage, sim_provider, sim_policy, tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    nonce = os.urandom(32)
    evidence = dataclasses.replace(sim_provider.get_evidence(report_data_for(spki_der_of(key), nonce)),
                                   binding=binding_parameters(nonce))
    genuine = _attested_der(encode_cmw(evidence), key)
    # control: undamaged, the same certificate passes the certificate checks and the appraisal
    control = Attestor("https://127.0.0.1:1", sim_policy)
    report = control.new_report()
    control.appraise_certificate(report, control.certificate_facts(report, genuine))
    assert all(step.ok for step in report.steps)

    server = _RecordingTlsServer(damage(genuine), key, tmp_path)
    try:
        with AttestedClient(f"https://127.0.0.1:{server.port}", policy=sim_policy) as client:
            with pytest.raises(AttestedTLSError) as info:
                client.get("/v1/secret", headers={"Authorization": f"Bearer {PAT}"})
    finally:
        server.close()
    assert [(s.name, s.ok) for s in info.value.report.steps] == [("certificate", False)]
    assert server.handshakes == 1  # TLS completed; refused once, not retried
    assert bytes(server.recorded) == b""  # not one request byte, no PAT
