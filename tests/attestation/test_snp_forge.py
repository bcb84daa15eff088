"""Throw-away SNP platforms for tests (ARK -> ASK/ASVK -> VCEK/VLEK with AMD extensions, reports,
CRLs) plus loaders for the real vectors; and tests of paths only a forged platform can reach
(Turin reports, MASK_CHIP_KEY, CRL revocation, naming and key rules)."""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from functools import lru_cache

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from attestation.errors import CollateralError, ParseError, VerificationError
from attestation.snp import RootTrust, parse_report, verify_report
from attestation.snp.tcb import decode_tcb, encode_tcb
from tests.conftest import VECTORS, inside_validity

PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
NOW = datetime(2026, 6, 1, tzinfo=timezone.utc)


# --- real vectors --------------------------------------------------------------------------------

def read_report(rel: str) -> bytes:
    raw = (VECTORS / rel).read_bytes()
    return bytes.fromhex(raw.decode().strip()) if rel.endswith(".hex") else raw


def vector_inputs(v: dict) -> tuple[bytes, bytes, bytes, datetime]:
    """(report, vek bytes, ask_ark bytes, time inside validity) of an expected.json SNP entry."""
    return (read_report(v["report"]), (VECTORS / v["vek"]).read_bytes(),
            (VECTORS / v["ask_ark"]).read_bytes(), inside_validity(v["vek_not_before"]))


def root(name: str) -> bytes:
    return (VECTORS / "roots" / name).read_bytes()


# --- forging ------------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def rsa_key(tag: str) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@lru_cache(maxsize=None)
def ec_key(tag: str) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def _name(cn: str, org: str = "Test Micro Devices") -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Engineering"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _der_int(v: int) -> bytes:
    body = v.to_bytes(1, "big") if v < 0x80 else b"\x00" + v.to_bytes(1, "big")
    return b"\x02" + bytes([len(body)]) + body


def _der_ia5(s: str) -> bytes:
    return b"\x16" + bytes([len(s)]) + s.encode()


def amd_extensions(product_name: str, tcb: int, *, hwid: bytes | None, csp_id: str | None,
                   turin: bool) -> list[x509.UnrecognizedExtension]:
    t = decode_tcb(tcb, "Turin" if turin else "Milan")
    arc = "1.3.6.1.4.1.3704.1."
    vals = {"1": _der_int(1 if turin else 0), "2": _der_ia5(product_name), "3.1": _der_int(t.bl),
            "3.2": _der_int(t.tee), "3.3": _der_int(t.snp), "3.5": _der_int(t.spl5),
            "3.6": _der_int(t.spl6), "3.7": _der_int(t.spl7), "3.8": _der_int(t.ucode)}
    if turin:
        vals["3.9"] = _der_int(t.fmc or 0)
    else:
        vals["3.4"] = _der_int(t.spl4 or 0)
    if hwid is not None:
        vals["4"] = hwid
    if csp_id is not None:
        vals["5"] = _der_ia5(csp_id)
    return [x509.UnrecognizedExtension(x509.ObjectIdentifier(arc + k), v) for k, v in vals.items()]


def _cert(subject: x509.Name, issuer: x509.Name, public_key, signer, *, ca: bool, serial: int,
          not_before: datetime, not_after: datetime, extra=(), pss: bool = True) -> x509.Certificate:
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
         .serial_number(serial).not_valid_before(not_before).not_valid_after(not_after))
    if ca:
        b = b.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    for ext in extra:
        b = b.add_extension(ext, critical=False)
    return b.sign(signer, hashes.SHA384(), rsa_padding=PSS if pss else padding.PKCS1v15())


def kds_crl_url(product: str, *, vlek: bool) -> str:
    return f"https://kds.test/{'vlek' if vlek else 'vcek'}/v1/{product}/crl"


def crl_dp(url: str) -> x509.CRLDistributionPoints:
    return x509.CRLDistributionPoints([x509.DistributionPoint([x509.UniformResourceIdentifier(url)], None, None, None)])


def _der_tlv(tag: int, body: bytes) -> bytes:
    n = len(body)
    length = bytes([n]) if n < 0x80 else bytes([0x80 | ((n.bit_length() + 7) // 8)]) + n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag]) + length + body


def _der_children(der: bytes) -> list[bytes]:
    """The encoded TLVs inside the outer SEQUENCE of ``der``."""
    def header(buf: bytes, i: int) -> tuple[int, int]:
        first = buf[i + 1]
        if first < 0x80:
            return i + 2, first
        k = first & 0x7F
        return i + 2 + k, int.from_bytes(buf[i + 2:i + 2 + k], "big")
    start, length = header(der, 0)
    out, i = [], start
    while i < start + length:
        body, n = header(der, i)
        out.append(der[i:body + n])
        i = body + n
    return out


@dataclass
class Platform:
    product: str = "Milan"
    tag: str = "a"
    org: str = "Test Micro Devices"
    vlek: bool = False
    chip_id: bytes = field(default_factory=lambda: bytes(range(1, 65)))
    reported_tcb: int = 0x7308000000000003
    not_before: datetime = datetime(2025, 1, 1, tzinfo=timezone.utc)
    not_after: datetime = datetime(2030, 1, 1, tzinfo=timezone.utc)
    product_name: str | None = None

    def __post_init__(self) -> None:
        p = self.product
        turin = p == "Turin"
        if turin and self.chip_id == bytes(range(1, 65)):
            self.chip_id = bytes(range(1, 9)) + bytes(56)
        self.ark_key, self.ask_key = rsa_key(self.tag + "ark"), rsa_key(self.tag + "ask")
        self.vek_key = ec_key(self.tag + "vek")
        ark_name = _name(f"ARK-{p}", self.org)
        inter_name = _name(f"SEV-VLEK-{p}" if self.vlek else f"SEV-{p}", self.org)
        # CRL distribution points as AMD's: the ARK and ASK name the VCEK CRL, the ASVK the VLEK one.
        self.ark = _cert(ark_name, ark_name, self.ark_key.public_key(), self.ark_key, ca=True, serial=1,
                         not_before=self.not_before - timedelta(days=365), not_after=self.not_after,
                         extra=[crl_dp(kds_crl_url(p, vlek=False))])
        self.ask = _cert(inter_name, ark_name, self.ask_key.public_key(), self.ark_key, ca=True, serial=0x1234,
                         not_before=self.not_before - timedelta(days=365), not_after=self.not_after,
                         extra=[crl_dp(kds_crl_url(p, vlek=self.vlek))])
        hwid = None if self.vlek else (self.chip_id[:8] if turin else self.chip_id)
        exts = amd_extensions(self.product_name or (p if turin or self.vlek else f"{p}-B0"),
                              self.reported_tcb, hwid=hwid, csp_id="CN=test-csp" if self.vlek else None,
                              turin=turin)
        self.vek = _cert(_name("SEV-VLEK" if self.vlek else "SEV-VCEK", self.org), inter_name,
                         self.vek_key.public_key(), self.ask_key, ca=False, serial=7,
                         not_before=self.not_before, not_after=self.not_after, extra=exts)

    @property
    def trust(self) -> RootTrust:
        fp = hashlib.sha256(self.ark.public_bytes(serialization.Encoding.DER)).hexdigest()
        return RootTrust(name="test", ark_fingerprints={self.product: frozenset({fp})}, organization=self.org,
                         ark_cn="ARK-{product}", ask_cn="SEV-{product}", asvk_cn="SEV-VLEK-{product}",
                         vcek_cn="SEV-VCEK", vlek_cn="SEV-VLEK", min_rsa_bits=2048)

    def chain(self) -> list[x509.Certificate]:
        return [self.ask, self.ark]

    def report(self, *, version: int = 2, cpuid: tuple[int, int, int] = (0, 0, 0), policy: int = 0x30000,
               report_data: bytes = bytes(64), mask_chip: bool = False, key=None,
               mit: tuple[int, int] = (0, 0)) -> bytes:
        r = bytearray(0x4A0)
        struct.pack_into("<IIQ", r, 0, version, 1, policy)
        struct.pack_into("<II", r, 0x30, 0, 1)
        struct.pack_into("<QQ", r, 0x38, self.reported_tcb, 0x1)
        signer = (1 << 2 if self.vlek else 0) | (2 if mask_chip else 0)
        struct.pack_into("<I", r, 0x48, signer)
        r[0x50:0x90] = report_data
        r[0x90:0xC0] = hashlib.sha384(b"measurement").digest()
        r[0x160:0x180] = b"\xff" * 32
        struct.pack_into("<Q", r, 0x180, self.reported_tcb)
        if version >= 3:
            r[0x188:0x18B] = bytes(cpuid)
        if not mask_chip and not self.vlek:
            r[0x1A0:0x1E0] = self.chip_id
        struct.pack_into("<Q", r, 0x1E0, self.reported_tcb)
        r[0x1E8:0x1EB] = bytes([5, 55, 1])
        r[0x1EC:0x1EF] = bytes([5, 55, 1])
        struct.pack_into("<QQQ", r, 0x1F0, self.reported_tcb, *mit)
        der = (key or self.vek_key).sign(bytes(r[:0x2A0]), ec.ECDSA(hashes.SHA384()))
        rr, ss = decode_dss_signature(der)
        r[0x2A0:0x2A0 + 72] = rr.to_bytes(72, "little")
        r[0x2E8:0x2E8 + 72] = ss.to_bytes(72, "little")
        return bytes(r)

    def crl(self, revoked_serials=(), *, next_update: datetime | None = None, signer=None,
            this_update: datetime | None = None, scope: str | None = None) -> x509.CertificateRevocationList:
        """An ARK-signed CRL; ``scope``: the URI of an Issuing Distribution Point extension."""
        b = (x509.CertificateRevocationListBuilder().issuer_name(self.ark.subject)
             .last_update(this_update or NOW - timedelta(days=1)).next_update(next_update or NOW + timedelta(days=30)))
        for s in revoked_serials:
            b = b.add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(s)
                                          .revocation_date(NOW - timedelta(days=2)).build())
        if scope is not None:
            b = b.add_extension(x509.IssuingDistributionPoint(
                full_name=[x509.UniformResourceIdentifier(scope)], relative_name=None, only_contains_user_certs=False,
                only_contains_ca_certs=False, only_some_reasons=None, indirect_crl=False,
                only_contains_attribute_certs=False), critical=True)
        return b.sign(signer or self.ark_key, hashes.SHA384(), rsa_padding=PSS)

    def crl_without_next_update(self) -> x509.CertificateRevocationList:
        """An ARK-signed CRL whose TBSCertList has no nextUpdate (the builder cannot make one)."""
        tbs = _der_children(self.crl().tbs_certlist_bytes)
        assert tbs[4][0] == 0x17  # version, signature, issuer, thisUpdate, nextUpdate (UTCTime), ...
        body = b"".join(tbs[:4] + tbs[5:])
        new_tbs = _der_tlv(0x30, body)
        signature = self.ark_key.sign(new_tbs, PSS, hashes.SHA384())
        sig_alg = _der_children(self.crl().public_bytes(serialization.Encoding.DER))[1]
        der = _der_tlv(0x30, new_tbs + sig_alg + _der_tlv(0x03, b"\x00" + signature))
        return x509.load_der_x509_crl(der)


@pytest.fixture(scope="module")
def milan() -> Platform:
    return Platform()


# --- tests --------------------------------------------------------------------------------------

def test_forged_milan_verifies_with_its_trust(milan: Platform) -> None:
    ev = verify_report(milan.report(report_data=b"\x07" * 64), vek=milan.vek, chain=milan.chain(),
                       at=NOW, trust=milan.trust)
    assert ev.platform == "snp" and ev.product == "Milan"
    assert ev.claims["report_data"] == "07" * 64
    assert ev.claims["vek_product_name"] == "Milan-B0"
    assert [c.name for c in ev.checks][-1] == "report_signature"


def test_forged_chain_refused_under_amd_trust(milan: Platform) -> None:
    with pytest.raises(VerificationError) as e:
        verify_report(milan.report(), vek=milan.vek, chain=milan.chain(), at=NOW)
    assert e.value.checks[-1].name == "chain_names"  # O= Test Micro Devices is not AMD


def test_sim_named_trust_yields_sim_platform(milan: Platform) -> None:
    t = milan.trust
    sim = RootTrust(name="sim", ark_fingerprints=t.ark_fingerprints, organization=t.organization,
                    ark_cn=t.ark_cn, ask_cn=t.ask_cn, asvk_cn=t.asvk_cn, vcek_cn=t.vcek_cn, vlek_cn=t.vlek_cn,
                    min_rsa_bits=2048)
    assert verify_report(milan.report(), vek=milan.vek, chain=milan.chain(), at=NOW, trust=sim).platform == "sim"


def test_report_signed_by_another_key_refused(milan: Platform) -> None:
    with pytest.raises(VerificationError) as e:
        verify_report(milan.report(key=ec_key("other")), vek=milan.vek, chain=milan.chain(), at=NOW,
                      trust=milan.trust)
    assert e.value.checks[-1].name == "report_signature"


def test_crl_revoking_the_ask_refuses(milan: Platform) -> None:
    report = milan.report()
    ok = verify_report(report, vek=milan.vek, chain=milan.chain(), at=NOW, trust=milan.trust,
                       check_crl=True, crls=[milan.crl([0x999])])
    assert any(c.name == "crl" and c.ok for c in ok.checks)
    with pytest.raises(VerificationError) as e:
        verify_report(report, vek=milan.vek, chain=milan.chain(), at=NOW, trust=milan.trust,
                      check_crl=True, crls=[milan.crl([milan.ask.serial_number])])
    assert e.value.checks[-1].name == "crl" and "revoked" in e.value.checks[-1].detail


def test_crl_must_be_signed_by_the_ark_and_current(milan: Platform) -> None:
    report = milan.report()
    forged = milan.crl([], signer=rsa_key("stranger"))
    with pytest.raises(VerificationError, match="CRL signature"):
        verify_report(report, vek=milan.vek, chain=milan.chain(), at=NOW, trust=milan.trust,
                      check_crl=True, crls=[forged])
    stale = milan.crl([], next_update=NOW - timedelta(hours=1))
    with pytest.raises(VerificationError, match="CRL expired"):
        verify_report(report, vek=milan.vek, chain=milan.chain(), at=NOW, trust=milan.trust,
                      check_crl=True, crls=[stale])
    with pytest.raises(CollateralError):
        verify_report(report, vek=milan.vek, chain=milan.chain(), at=NOW, trust=milan.trust, check_crl=True)


def test_turin_v3_report_uses_turin_layout_and_8_byte_hwid() -> None:
    tcb = 0x5100000004010101
    turin = Platform(product="Turin", tag="t", reported_tcb=tcb)
    report = turin.report(version=3, cpuid=(0x1A, 0x02, 0x01))
    ev = verify_report(report, vek=turin.vek, chain=turin.chain(), at=NOW, trust=turin.trust)
    assert ev.product == "Turin"
    assert ev.claims["reported_tcb_parts"] == {"fmc": 1, "bl": 1, "tee": 1, "snp": 4, "ucode": 0x51}
    assert ev.claims["cpuid_fam_mod_step"] == "1a0201"
    # The same report read as Milan (caller insists) conflicts with CPUID.
    with pytest.raises(VerificationError) as e:
        verify_report(report, vek=turin.vek, chain=turin.chain(), at=NOW, trust=turin.trust, product="Milan")
    assert e.value.checks[-1].name == "product"


def test_turin_chip_id_mismatch_refused() -> None:
    turin = Platform(product="Turin", tag="t", reported_tcb=0x5100000004010101)
    other = Platform(product="Turin", tag="t", reported_tcb=0x5100000004010101,
                     chip_id=bytes(range(9, 17)) + bytes(56))
    other.vek = turin.vek  # same key, different chip in the report
    other.vek_key = turin.vek_key
    with pytest.raises(VerificationError) as e:
        verify_report(other.report(version=3, cpuid=(0x1A, 0x02, 0x01)), vek=turin.vek, chain=turin.chain(),
                      at=NOW, trust=turin.trust)
    assert e.value.checks[-1].name == "chip_id_matches_vek"


def test_masked_chip_id_skips_hwid_binding_with_a_recorded_check(milan: Platform) -> None:
    ev = verify_report(milan.report(mask_chip=True), vek=milan.vek, chain=milan.chain(), at=NOW,
                       trust=milan.trust)
    check = next(c for c in ev.checks if c.name == "chip_id_matches_vek")
    assert check.ok and "MASK_CHIP_KEY" in check.detail
    assert ev.claims["mask_chip_id"] is True


def test_tcb_mismatch_with_vek_refused(milan: Platform) -> None:
    other = Platform(tag="a", reported_tcb=encode_tcb("Milan", bl=3, tee=0, snp=9, ucode=0x73))
    with pytest.raises(VerificationError) as e:
        verify_report(other.report(), vek=milan.vek, chain=milan.chain(), at=NOW, trust=milan.trust)
    assert e.value.checks[-1].name == "tcb_matches_vek"


def test_forged_vlek_path_and_kind_mismatch() -> None:
    vlek = Platform(tag="v", vlek=True)
    ev = verify_report(vlek.report(), vek=vlek.vek, chain=vlek.chain(), at=NOW, trust=vlek.trust)
    assert ev.claims["signing_key"] == "VLEK" and ev.claims["csp_id"] == "CN=test-csp"
    vcek = Platform(tag="v")
    with pytest.raises(VerificationError) as e:  # a VCEK-signed report presented with the VLEK
        verify_report(vcek.report(), vek=vlek.vek, chain=vlek.chain(), at=NOW, trust=vlek.trust)
    assert e.value.checks[-1].name == "signing_key_matches_vek"


def test_small_rsa_key_and_pkcs1_signature_refused() -> None:
    p = Platform(tag="a")
    strict = RootTrust(**{**p.trust.__dict__, "min_rsa_bits": 4096})
    with pytest.raises(VerificationError) as e:
        verify_report(p.report(), vek=p.vek, chain=p.chain(), at=NOW, trust=strict)
    assert e.value.checks[-1].name == "chain_keys"
    p.vek = _cert(p.vek.subject, p.ask.subject, p.vek_key.public_key(), p.ask_key, ca=False, serial=7,
                  not_before=p.not_before, not_after=p.not_after, pss=False,
                  extra=[e.value for e in p.vek.extensions])
    with pytest.raises(VerificationError) as e:
        verify_report(p.report(), vek=p.vek, chain=p.chain(), at=NOW, trust=p.trust)
    assert e.value.checks[-1].name == "vek_chain" and "RSASSA-PSS" in e.value.checks[-1].detail


def test_ark_not_pinned_refused_even_if_self_consistent(milan: Platform) -> None:
    stranger = Platform(tag="s")
    with pytest.raises(VerificationError) as e:
        verify_report(stranger.report(), vek=stranger.vek, chain=stranger.chain(), at=NOW, trust=milan.trust)
    assert e.value.checks[-1].name == "ark_pinned"


def test_missing_certificates_without_kds_is_collateral_error(milan: Platform) -> None:
    with pytest.raises(CollateralError):
        verify_report(milan.report(), chain=milan.chain(), at=NOW, trust=milan.trust)
    with pytest.raises(CollateralError):
        verify_report(milan.report(), vek=milan.vek, at=NOW, trust=milan.trust)


def test_chain_with_two_arks_refused(milan: Platform) -> None:
    other = Platform(tag="s")
    with pytest.raises(VerificationError) as e:
        verify_report(milan.report(), vek=milan.vek, chain=[milan.ask, milan.ark, other.ark], at=NOW,
                      trust=milan.trust)
    assert e.value.checks[-1].name == "chain_certificates"


def test_all_certificates_in_one_chain_sequence(milan: Platform) -> None:
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (milan.vek, milan.ask, milan.ark))
    ev = verify_report(milan.report(), chain=pem, at=NOW, trust=milan.trust)
    assert ev.product == "Milan"


def test_parse_rejects_forged_mbz_violations(milan: Platform) -> None:
    good = bytearray(milan.report())
    parse_report(bytes(good))
    for off, val in ((0x4C, 1), (0x18B, 1), (0x1EB, 1), (0x1F8, 1), (0x208, 1), (0x2A0 + 48, 1), (0x330, 1)):
        bad = bytearray(good)
        bad[off] ^= val
        with pytest.raises(ParseError):
            parse_report(bytes(bad))
    v3 = bytearray(milan.report(version=3, cpuid=(0x19, 0x01, 0x01)))
    assert parse_report(bytes(v3)).cpuid_fam_mod_step == "190101"
    bad = bytearray(milan.report(version=2))
    bad[0x188] = 0x19
    with pytest.raises(ParseError):
        parse_report(bytes(bad))
    with pytest.raises(ParseError):
        parse_report(milan.report(policy=0x20000 | 1 << 26))
    with pytest.raises(ParseError):
        parse_report(milan.report(policy=0x10000))


def test_version_5_mitigation_vectors_and_version_4_as_3(milan: Platform) -> None:
    ev = verify_report(milan.report(version=5, cpuid=(0x19, 0x01, 0x01), mit=(0x3, 0x7)), vek=milan.vek,
                       chain=milan.chain(), at=NOW, trust=milan.trust)
    assert (ev.claims["version"], ev.claims["launch_mit_vector"], ev.claims["current_mit_vector"]) == \
        (5, "0x0000000000000003", "0x0000000000000007")
    v4 = verify_report(milan.report(version=4, cpuid=(0x19, 0x01, 0x01)), vek=milan.vek, chain=milan.chain(),
                       at=NOW, trust=milan.trust)
    assert v4.claims["cpuid_fam_mod_step"] == "190101" and v4.claims["current_mit_vector"] is None
    with pytest.raises(ParseError):
        parse_report(milan.report(version=4, cpuid=(0x19, 0x01, 0x01), mit=(1, 0)))
    for version in (1, 6):
        with pytest.raises(ParseError, match="version"):
            parse_report(milan.report(version=version))
