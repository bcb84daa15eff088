"""verify_report: the SEV-SNP verification recipe, one named check per step.

Order: report format -> certificates (given, or fetched from AMD KDS) -> product family ->
VEK kind vs SIGNING_KEY -> chain to a pinned ARK (cached) -> CRL (optional) -> product, TCB and
chip binding of the VEK -> ECDSA P-384 report signature. The first failing check raises
VerificationError carrying every check made so far. Policy (debug, TCB minimums, ...) is not
judged here: that is appraisal's job.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import NameOID

from ..errors import CollateralError, ParseError, VerificationError
from ..verdict import CheckLog, VerifiedEvidence
from ..x509parse import inspect_crl, load_pem_or_der_crl
from .certs import VekExtensions, cert_der, load_certificate, load_certificates, parse_vek_extensions
from .chain import LruCache, clear_chain_cache, verify_chain
from .chain import VerifiedChain, crl_covers, crl_distribution_points
from .chain import check_crl as _check_crl_against
from .report import Report, parse_report, report_claims
from .tcb import LAYOUT_TURIN, decode_tcb, family_from_name, layout_for, resolve_product
from .trust import AMD_TRUST, RootTrust

if TYPE_CHECKING:
    from .kds import KdsClient

CertLike = bytes | bytearray | memoryview | x509.Certificate
_ECDSA_SHA384 = ec.ECDSA(hashes.SHA384())

@dataclass(frozen=True)
class _Loaded:
    """A certificate with what classifying it needs, computed once per distinct input."""

    cert: x509.Certificate
    der: bytes
    self_issued: bool
    cn: str | None


_load_cache: LruCache[bytes, tuple[_Loaded, ...]] = LruCache(512)
_MAX_CACHED_INPUT = 16 * 1024  # a certificate chain is ~5 KB; larger inputs are parsed each time
_ext_cache: LruCache[bytes, VekExtensions] = LruCache(512)


def clear_caches() -> None:
    """Forget verified chains, parsed certificates and VEK extensions (benchmarks, tests)."""
    clear_chain_cache()
    _load_cache.clear()
    _ext_cache.clear()


def _loaded(cert: x509.Certificate) -> _Loaded:
    return _Loaded(cert, cert_der(cert), cert.issuer == cert.subject, _cn(cert))


def _load(item: CertLike) -> tuple[_Loaded, ...]:
    if isinstance(item, x509.Certificate):
        return (_loaded(load_certificate(item)),)
    raw = item if isinstance(item, bytes) else bytes(item)
    hit = _load_cache.get(raw)
    if hit is None:
        hit = tuple(_loaded(c) for c in load_certificates(raw))
        if len(raw) <= _MAX_CACHED_INPUT:
            _load_cache.put(raw, hit)
    return hit


def _extensions(vek: x509.Certificate, der: bytes) -> VekExtensions:
    ext = _ext_cache.get(der)
    if ext is None:
        ext = parse_vek_extensions(vek)
        _ext_cache.put(der, ext)
    return ext


def _cn(cert: x509.Certificate) -> str | None:
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if len(attrs) == 1 else None


def _as_utc(at: datetime | None) -> datetime:
    if at is None:
        return datetime.now(timezone.utc)
    return at if at.tzinfo is not None else at.replace(tzinfo=timezone.utc)


def verify_report(report: bytes | Report, *, vek: CertLike | None = None,
                  chain: Sequence[CertLike] | CertLike = (), product: str | None = None,
                  at: datetime | None = None, trust: RootTrust = AMD_TRUST,
                  kds: KdsClient | None = None, check_crl: bool = False,
                  crls: Sequence[bytes | x509.CertificateRevocationList] = ()) -> VerifiedEvidence:
    """Verify an SNP report against its VCEK/VLEK and ASK/ASVK + ARK chain.

    ``chain`` holds the ASK or ASVK and the ARK (bytes in PEM or DER, or certificates; one PEM blob
    with both is fine; a VEK found there is used when ``vek`` is None). Missing certificates come
    from ``kds`` when given, else CollateralError. ``at`` (default: now; naive means UTC) is the
    verification time. ``crls`` (e.g. the CRL carried in evidence) are always checked: issued and signed
    by the ARK, with a nextUpdate, current at ``at``, not listing the ASK/ASVK. ``check_crl`` also
    *requires* one of them to be the CRL covering this chain's ASK/ASVK (``chain.crl_covers``); with no
    CRL given it is fetched from ``kds`` (the key kind's own KDS path), else CollateralError.
    """
    # A Report object is re-read from its raw bytes: the claims must be the fields the signature covers,
    # whatever was done to the object (one struct unpack).
    rep = parse_report(report.raw if isinstance(report, Report) else report)
    when = _as_utc(at)
    log = CheckLog()
    kind = rep.signing_key_name
    log.ok("report_format", f"version {rep.version}, signed by {kind}, policy {rep.policy:#x}")

    # Certificates handed in.
    if isinstance(chain, (bytes, bytearray, memoryview, x509.Certificate)):
        chain = [chain]
    vek_item: _Loaded | None = None
    if vek is not None:
        loaded = _load(vek)
        if len(loaded) != 1:
            raise ParseError("vek must hold exactly one certificate")
        vek_item = loaded[0]
    arks: dict[bytes, _Loaded] = {}
    inters: dict[bytes, _Loaded] = {}
    veks: dict[bytes, _Loaded] = {}
    vek_cns = {trust.vcek_cn.format(product=""), trust.vlek_cn.format(product="")}
    for item in chain:
        for c in _load(item):
            if c.self_issued:
                arks[c.der] = c
            elif c.cn in vek_cns:
                veks[c.der] = c
            else:
                inters[c.der] = c
    if vek_item is None and veks:
        if len(veks) != 1:
            log.fail("chain_certificates", f"{len(veks)} different VEK certificates in the chain")
        (vek_item,) = veks.values()
    if len(arks) > 1 or len(inters) > 1:
        log.fail("chain_certificates",
                 f"chain holds {len(arks)} self-issued and {len(inters)} intermediate certificates; expected one each")

    if vek_item is None and kds is None:
        raise CollateralError(f"the {kind} certificate is missing and no KDS client was given")
    if vek_item is None and kind == "VLEK":
        raise CollateralError("the VLEK certificate is missing (AMD KDS does not publish VLEKs)")

    # Product family: CPUID (v>=3), VEK productName, caller.
    vek_ext = _extensions(vek_item.cert, vek_item.der) if vek_item is not None else None
    try:
        family, how = resolve_product(rep, vek_ext.product_name if vek_ext else None, product)
    except VerificationError as e:
        log.fail("product", str(e).removeprefix("product: "))
    log.ok("product", f"{family} ({how})")

    # Fetch what is missing.
    if vek_item is None:
        assert kds is not None
        if rep.mask_chip_key:
            raise CollateralError("MASK_CHIP_KEY is set: the VCEK cannot be fetched by chip id")
        cert = kds.vcek(family, rep.chip_id, decode_tcb(rep.reported_tcb, family))
        vek_item = _loaded(load_certificate(cert))  # inspected even when kds is not our KdsClient
        vek_ext = _extensions(vek_item.cert, vek_item.der)
    assert vek_ext is not None
    if not arks or not inters:
        if kds is None:
            raise CollateralError(f"the {'ASVK' if kind == 'VLEK' else 'ASK'} and ARK certificates are "
                                  "needed and no KDS client was given")
        fetched = kds.cert_chain(family, vlek=kind == "VLEK")
        if len(fetched) != 2:
            raise CollateralError("KDS cert_chain did not hold exactly two certificates")
        if not inters:
            item = _loaded(load_certificate(fetched[0]))
            inters[item.der] = item
        if not arks:
            item = _loaded(load_certificate(fetched[1]))
            arks[item.der] = item
    (ark_item,) = arks.values()
    (inter_item,) = inters.values()
    ark, ark_der, inter, inter_der = ark_item.cert, ark_item.der, inter_item.cert, inter_item.der
    vek_cert, vek_der = vek_item.cert, vek_item.der

    # The VEK must be of the kind the report says signed it.
    expected_cn = (trust.vlek_cn if kind == "VLEK" else trust.vcek_cn).format(product=family)
    problems = []
    if vek_item.cn != expected_cn:
        problems.append(f"certificate CN {vek_item.cn!r} is not {expected_cn!r}")
    if kind == "VCEK" and (vek_ext.hwid is None or vek_ext.csp_id is not None):
        problems.append("a VCEK carries hwID and no cspID")
    if kind == "VLEK" and (vek_ext.csp_id is None or vek_ext.hwid is not None):
        problems.append("a VLEK carries cspID and no hwID")
    log.require(not problems, "signing_key_matches_vek", f"report SIGNING_KEY {kind} and a {kind} certificate",
                f"report SIGNING_KEY is {kind} but " + "; ".join(problems))

    verified = verify_chain(ark, ark_der, inter, inter_der, vek_cert, vek_der, product=family, kind=kind,
                            trust=trust, at=when, log=log)

    revocation_checked = False
    if check_crl or crls:
        revocation_checked = _check_revocation(verified, crls, family=family, kind=kind, kds=kds,
                                               required=check_crl, at=when, log=log)

    # Binding of the VEK to this product, TCB and chip.
    vek_family = family_from_name(vek_ext.product_name)
    log.require(vek_family == family, "product_matches_vek", f"productName {vek_ext.product_name!r}",
                f"VEK productName {vek_ext.product_name!r} is not {family}")
    cert_tcb = vek_ext.tcb(family)
    if cert_tcb == rep.reported_tcb:
        log.ok("tcb_matches_vek", f"REPORTED_TCB {decode_tcb(rep.reported_tcb, family)}")
    else:
        log.fail("tcb_matches_vek", f"REPORTED_TCB {decode_tcb(rep.reported_tcb, family)} != "
                                    f"VEK {decode_tcb(cert_tcb, family)}")
    # The firmware never reports (nor may a VEK be derived for) a TCB above the one it runs.
    reported, current = decode_tcb(rep.reported_tcb, family), decode_tcb(rep.current_tcb, family)
    above = [f"{part} {getattr(reported, part)} > {getattr(current, part)}"
             for part in ("fmc", "bl", "tee", "snp", "ucode")
             if (getattr(reported, part) or 0) > (getattr(current, part) or 0)]
    log.require(not above, "tcb_not_above_current", f"REPORTED_TCB <= CURRENT_TCB {current}",
                "REPORTED_TCB exceeds CURRENT_TCB: " + ", ".join(above))
    if kind == "VLEK":
        log.ok("chip_id_matches_vek", "not applicable: a VLEK is not bound to a chip")
    elif rep.mask_chip_key:
        log.ok("chip_id_matches_vek", "skipped: MASK_CHIP_KEY is set, CHIP_ID is zero")
    else:
        assert vek_ext.hwid is not None
        turin = layout_for(family) == LAYOUT_TURIN
        chip = rep.chip_id[:8] if turin else rep.chip_id
        log.require(hmac.compare_digest(vek_ext.hwid, chip), "chip_id_matches_vek",
                    f"hwID == CHIP_ID{'[0:8]' if turin else ''}",
                    f"VCEK hwID {vek_ext.hwid.hex()} != CHIP_ID {chip.hex()}")

    # Finally the report signature itself.
    signature = encode_dss_signature(rep.signature_r, rep.signature_s)
    try:
        verified.vek_public_key.verify(signature, rep.signed_bytes, _ECDSA_SHA384)
    except InvalidSignature:
        log.fail("report_signature", f"ECDSA P-384 signature does not verify with the {kind}")
    log.ok("report_signature", f"ECDSA P-384 SHA-384 by the {kind}")

    claims = report_claims(rep, family)
    claims["vek_product_name"] = vek_ext.product_name
    if vek_ext.csp_id is not None:
        claims["csp_id"] = vek_ext.csp_id
    return VerifiedEvidence(platform="sim" if trust.name == "sim" else "snp", product=family,
                            claims=claims, checks=log.checks, revocation_checked=revocation_checked)



def _check_revocation(verified: VerifiedChain, crls: Sequence[bytes | x509.CertificateRevocationList], *,
                      family: str, kind: str, kds: KdsClient | None, required: bool, at: datetime,
                      log: CheckLog) -> bool:
    """Check every CRL given; when ``required``, one must cover the chain's ASK/ASVK. True when one covered it.

    A CRL from the evidence covers it only by what it says (its scope, see ``chain.crl_scope``): the
    host assembles evidence and could offer the VCEK CRL for a VLEK chain. One this verifier fetched
    itself from the kind's own KDS path is taken as that path's CRL: the caller chose that source.
    Given a KDS client, a required check always consults it too: the host could also attach an older CRL
    of the right scope (ARK-signed, before its nextUpdate) issued before the ASK/ASVK was revoked.
    """
    supplied = [inspect_crl(c) if isinstance(c, x509.CertificateRevocationList) else _load_crl(c) for c in crls]
    found = [_check_crl_against(crl, verified, at=at, log=log) for crl in supplied]
    covered = any(crl_covers(crl, verified) for crl in supplied)
    fetched = False
    if required and kds is not None:
        crl = inspect_crl(kds.crl(family, vlek=kind == "VLEK"))
        found.insert(0, _check_crl_against(crl, verified, at=at, log=log))
        covered = fetched = True
    elif required and not covered and not supplied:
        raise CollateralError("check_crl needs a CRL: pass crls= or a KDS client")
    inter_cn = _cn(verified.intermediate)
    where = ", ".join(sorted(crl_distribution_points(verified.intermediate))) or "no CRL distribution point"
    if covered:
        log.ok("crl", f"{found[0]}: the CRL covering {inter_cn} ({where}) is current"
               + (" (fetched from KDS by this verifier)" if fetched else ""))
    elif required:
        log.fail("crl", f"no CRL given covers {inter_cn} (published at {where}); a CRL of another "
                        "scope, such as the VCEK CRL for a VLEK chain, says nothing about it")
    elif supplied:
        log.ok("crl", f"no CRL covering {inter_cn} was given; revocation not checked (not required)")
    return covered


def _load_crl(data: bytes) -> x509.CertificateRevocationList:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ParseError(f"a CRL must be bytes or a CertificateRevocationList, not {type(data).__name__}")
    return load_pem_or_der_crl(bytes(data), "CRL")
