"""The binding rule and the id-pe-cmw certificate extension."""

from __future__ import annotations

import hashlib
import os
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
from attestation.errors import EvidenceError
from attestation.evidence import Evidence, decode_cmw, encode_cmw

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
