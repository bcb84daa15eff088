"""The simulated platform: persisted chain in AMD's shapes, verified through the real SNP verifier."""

from __future__ import annotations

import hashlib
import os
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from attestation.errors import ProviderError, VerificationError
from attestation.sim import SIM_MEASUREMENT, SIM_ORGANIZATION, SimPlatform, sim_trust
from attestation.snp.report import parse_report
from attestation.snp.verify import verify_report


def test_persisted_with_private_permissions(sim_dir, sim_platform):
    assert stat.S_IMODE(os.stat(sim_dir).st_mode) == 0o700
    for name in ("ark_key.pem", "ask_key.pem", "vcek_key.pem"):
        assert stat.S_IMODE(os.stat(sim_dir / name).st_mode) == 0o600
    again = SimPlatform.load_or_create(sim_dir)
    assert again.fingerprint == sim_platform.fingerprint
    ark_der = (sim_dir / "ark.pem").read_bytes()
    from cryptography import x509

    assert hashlib.sha256(x509.load_pem_x509_certificate(ark_der).public_bytes(
        serialization.Encoding.DER)).hexdigest() == sim_platform.fingerprint
    assert len(sim_platform.fingerprint) == 64


def test_names_cannot_be_mistaken_for_amd(sim_platform):
    for cert in (sim_platform.ark, sim_platform.ask, sim_platform.vcek):
        org = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        assert org == SIM_ORGANIZATION and "NOT AMD" in org
        assert cn.startswith("SIM-")
        assert "Advanced Micro Devices" not in cert.subject.rfc4514_string()
    # AMD's shapes: RSA-4096 PSS-signed ARK/ASK, P-384 VCEK
    assert isinstance(sim_platform.ark.public_key(), rsa.RSAPublicKey)
    assert sim_platform.ark.public_key().key_size == 4096
    assert isinstance(sim_platform.vcek.public_key(), ec.EllipticCurvePublicKey)
    assert sim_platform.vcek.public_key().curve.name == "secp384r1"
    assert sim_platform.vcek.signature_algorithm_oid.dotted_string == "1.2.840.113549.1.1.10"


def test_report_verifies_through_the_snp_verifier(sim_platform):
    rd = bytes(range(64))
    report, certs = sim_platform.report(rd)
    assert len(report) == 0x4A0 and len(certs) == 3
    parsed = parse_report(report)
    assert parsed.version == 3 and parsed.policy & (1 << 17) and not parsed.debug
    verified = verify_report(report, vek=certs[0], chain=certs[1:], trust=sim_platform.trust)
    assert verified.platform == "sim"
    assert verified.product == "Sim"
    assert verified.claims["report_data"] == rd.hex()
    assert verified.claims["measurement"] == SIM_MEASUREMENT.hex()
    assert verified.claims["chip_id"] == sim_platform.chip_id.hex()
    assert all(c.ok for c in verified.checks)


def test_amd_trust_and_other_sim_roots_refuse_sim_reports(sim_platform):
    report, certs = sim_platform.report(bytes(64))
    with pytest.raises(VerificationError):
        verify_report(report, vek=certs[0], chain=certs[1:])  # AMD_TRUST
    with pytest.raises(VerificationError):
        verify_report(report, vek=certs[0], chain=certs[1:], trust=sim_trust("ab" * 32))


def test_flipped_report_refused(sim_platform):
    report, certs = sim_platform.report(bytes(64))
    for offset in (0x50, 0x90, 0x2A0):
        bad = bytearray(report)
        bad[offset] ^= 0x01
        with pytest.raises(VerificationError):
            verify_report(bytes(bad), vek=certs[0], chain=certs[1:], trust=sim_platform.trust)


def test_report_inputs_checked(sim_platform):
    with pytest.raises(ValueError):
        sim_platform.report(b"short")


def test_world_readable_key_refused(tmp_path, sim_dir):
    import shutil

    copy = tmp_path / "sim"
    shutil.copytree(sim_dir, copy)
    os.chmod(copy / "vcek_key.pem", 0o644)
    with pytest.raises(ProviderError, match="lets group or others read or write it.*chmod 600"):
        SimPlatform.load_or_create(copy)


def test_group_writable_or_foreign_owned_key_refused(tmp_path, sim_dir, monkeypatch):
    """Writable by the group (the key could be swapped) or owned by another user: refused, naming the fix."""
    import shutil

    copy = tmp_path / "sim"
    shutil.copytree(sim_dir, copy)
    os.chmod(copy / "ask_key.pem", 0o620)
    with pytest.raises(ProviderError, match=r"ask_key\.pem: its mode 620"):
        SimPlatform.load_or_create(copy)
    os.chmod(copy / "ask_key.pem", 0o600)
    SimPlatform.load_or_create(copy)
    monkeypatch.setattr(os, "geteuid", lambda: os.getuid() + 1)
    with pytest.raises(ProviderError, match="not by this process's user"):
        SimPlatform.load_or_create(copy)


def test_corrupt_directory_refused(tmp_path, sim_dir):
    import shutil

    copy = tmp_path / "sim"
    shutil.copytree(sim_dir, copy)
    (copy / "platform.json").write_text("{not json")
    with pytest.raises(ProviderError, match="corrupt"):
        SimPlatform.load_or_create(copy)
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "something").write_text("x")
    with pytest.raises(ProviderError, match="refusing to overwrite"):
        SimPlatform.load_or_create(stray)


def test_default_directory_from_environment(monkeypatch, tmp_path, sim_dir):
    import shutil

    from attestation.sim import default_sim_dir

    shutil.copytree(sim_dir, tmp_path / "env-sim")
    monkeypatch.setenv("CUBE_SIM_DIR", str(tmp_path / "env-sim"))
    assert default_sim_dir() == tmp_path / "env-sim"
    assert SimPlatform.load_or_create().fingerprint == SimPlatform.load_or_create(sim_dir).fingerprint


def test_sim_trust_rejects_bad_fingerprint():
    with pytest.raises(ValueError):
        sim_trust("xyz")


def test_crl_is_shaped_like_amd_kds(sim_platform):
    """Issued by the ARK, RSASSA-PSS SHA-384 salt 48, thisUpdate an hour back, nextUpdate in a week, no ASK listed."""
    from datetime import datetime, timedelta, timezone

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding
    from cryptography.x509.oid import SignatureAlgorithmOID

    now = datetime.now(timezone.utc)
    crl = x509.load_der_x509_crl(sim_platform.crl())
    assert crl.issuer == sim_platform.ark.subject
    assert crl.signature_algorithm_oid == SignatureAlgorithmOID.RSASSA_PSS
    salt_48 = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
    sim_platform.ark.public_key().verify(crl.signature, crl.tbs_certlist_bytes, salt_48, hashes.SHA384())
    assert abs(crl.last_update_utc - (now - timedelta(hours=1))) < timedelta(minutes=5)
    assert abs(crl.next_update_utc - (now + timedelta(days=7))) < timedelta(minutes=5)
    assert len(crl) == 0 and crl.get_revoked_certificate_by_serial_number(sim_platform.ask.serial_number) is None
    # and it passes the SNP verifier's CRL check for the sim chain
    report, certs = sim_platform.report(bytes(64))
    verified = verify_report(report, vek=certs[0], chain=certs[1:], trust=sim_platform.trust, check_crl=True,
                             crls=[sim_platform.crl()])
    assert any(c.name == "crl" and c.ok for c in verified.checks)


def test_crl_cached_then_reissued_near_next_update(tmp_path, sim_dir):
    import shutil
    from datetime import datetime, timedelta, timezone

    from cryptography import x509

    copy = tmp_path / "sim"
    shutil.copytree(sim_dir, copy)
    platform = SimPlatform.load_or_create(copy)
    now = datetime.now(timezone.utc)
    first = platform.crl(now=now)
    assert platform.crl(now=now + timedelta(days=5)) is first  # cached while more than a day remains
    renewed = platform.crl(now=now + timedelta(days=6, hours=12))
    assert renewed != first
    assert x509.load_der_x509_crl(renewed).next_update_utc > x509.load_der_x509_crl(first).next_update_utc


def test_crl_refused_when_ark_key_became_world_readable(tmp_path, sim_dir):
    """The ARK key is loaded lazily, on the first CRL; its 0600 check runs then too."""
    import shutil

    copy = tmp_path / "sim"
    shutil.copytree(sim_dir, copy)
    platform = SimPlatform.load_or_create(copy)
    os.chmod(copy / "ark_key.pem", 0o644)
    with pytest.raises(ProviderError, match="lets group or others read or write it"):
        platform.crl()
    os.chmod(copy / "ark_key.pem", 0o600)
    (copy / "ark_key.pem").unlink()
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    fd = os.open(copy / "ark_key.pem", os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(other.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    with pytest.raises(ProviderError, match="does not match"):
        platform.crl()
