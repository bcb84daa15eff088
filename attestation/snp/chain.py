"""ARK -> ASK/ASVK -> VCEK/VLEK chain verification, with a cache of verified chains.

AMD chains do not fit a generic RFC 5280 path builder (serial 0, no AKI on the VEK, PSS
trailerField), so every link is checked here by hand: names, pinned ARK, key types and sizes,
RSASSA-PSS/SHA-384/salt-48 signatures and validity at the injected time.

A verified chain is cached under (trust, product, kind, the three DER encodings) together with the
intersection of the three validity windows; a later verification with the same certificates at a
time inside that window replays the recorded checks instead of redoing the RSA work.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from typing import Generic, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID, SignatureAlgorithmOID

from ..verdict import Check, CheckLog
from .trust import RootTrust

AMD_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)

K = TypeVar("K")
V = TypeVar("V")


class LruCache(Generic[K, V]):
    """A small thread-safe LRU map."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._data: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            return value

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


@dataclass(frozen=True)
class VerifiedChain:
    ark: x509.Certificate
    intermediate: x509.Certificate
    vek: x509.Certificate
    vek_public_key: ec.EllipticCurvePublicKey
    not_before: datetime
    not_after: datetime
    checks: tuple[Check, ...]


_chain_cache: LruCache[tuple, VerifiedChain] = LruCache(256)


def clear_chain_cache() -> None:
    _chain_cache.clear()


def _cn(name: x509.Name) -> str | None:
    attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if len(attrs) == 1 else None


def _org(name: x509.Name) -> str | None:
    attrs = name.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    return str(attrs[0].value) if len(attrs) == 1 else None


def _pss_signed_by(cert: x509.Certificate, issuer_key: rsa.RSAPublicKey) -> str | None:
    """None if ``cert`` carries a valid RSASSA-PSS SHA-384 salt-48 signature by ``issuer_key``."""
    if cert.signature_algorithm_oid != SignatureAlgorithmOID.RSASSA_PSS:
        return f"signature algorithm {cert.signature_algorithm_oid.dotted_string} is not RSASSA-PSS"
    if not isinstance(cert.signature_hash_algorithm, hashes.SHA384):
        return "signature hash is not SHA-384"
    try:
        issuer_key.verify(cert.signature, cert.tbs_certificate_bytes, AMD_PSS, hashes.SHA384())
    except InvalidSignature:
        return "RSASSA-PSS signature does not verify"
    return None


def _is_ca(cert: x509.Certificate) -> bool | None:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return None
    return bc.ca


def _kind_names(trust: RootTrust, product: str, kind: str) -> tuple[str, str, str, str]:
    """(ARK CN, intermediate CN, VEK CN, intermediate label) for a VEK kind."""
    if kind == "VLEK":
        return (trust.ark_cn.format(product=product), trust.asvk_cn.format(product=product),
                trust.vlek_cn.format(product=product), "ASVK")
    return (trust.ark_cn.format(product=product), trust.ask_cn.format(product=product),
            trust.vcek_cn.format(product=product), "ASK")


def _verify_uncached(ark: x509.Certificate, ark_der: bytes, inter: x509.Certificate, inter_der: bytes,
                     vek: x509.Certificate, *, product: str, kind: str, trust: RootTrust,
                     log: CheckLog) -> VerifiedChain:
    start = len(log.checks)
    ark_cn, inter_cn, vek_cn, inter_label = _kind_names(trust, product, kind)
    il = inter_label.lower()

    # Names: subjects, issuers and organization.
    problems = []
    if _cn(ark.subject) != ark_cn:
        problems.append(f"ARK CN {_cn(ark.subject)!r} != {ark_cn!r}")
    if ark.issuer != ark.subject:
        problems.append("ARK is not self-issued")
    if _cn(inter.subject) != inter_cn:
        problems.append(f"{inter_label} CN {_cn(inter.subject)!r} != {inter_cn!r}")
    if inter.issuer != ark.subject:
        problems.append(f"{inter_label} issuer is not the ARK")
    if _cn(vek.subject) != vek_cn:
        problems.append(f"{kind} CN {_cn(vek.subject)!r} != {vek_cn!r}")
    if vek.issuer != inter.subject:
        problems.append(f"{kind} issuer is not the {inter_label}")
    for label, c in (("ARK", ark), (inter_label, inter), (kind, vek)):
        if _org(c.subject) != trust.organization:
            problems.append(f"{label} O={_org(c.subject)!r} != {trust.organization!r}")
    log.require(not problems, "chain_names", f"{ark_cn} -> {inter_cn} -> {vek_cn}", "; ".join(problems))

    # The root must be pinned: an ARK shipped with the evidence proves nothing by itself.
    fp = hashlib.sha256(ark_der).hexdigest()
    pinned = trust.ark_fingerprints.get(product, frozenset())
    log.require(fp in pinned, "ark_pinned", f"{trust.name} {product} ARK sha256 {fp}",
                f"ARK sha256 {fp} is not a pinned {trust.name} root for {product}")
    pinned_inter = trust.intermediate_fingerprints.get(product)
    if pinned_inter is not None:
        ifp = hashlib.sha256(inter_der).hexdigest()
        log.require(ifp in pinned_inter, f"{il}_pinned", f"{inter_label} sha256 {ifp}",
                    f"{inter_label} sha256 {ifp} is not pinned for {product}")

    # Keys and certificate profile.
    problems = []
    ark_key, inter_key, vek_key = ark.public_key(), inter.public_key(), vek.public_key()
    for label, c, key in (("ARK", ark, ark_key), (inter_label, inter, inter_key)):
        if not isinstance(key, rsa.RSAPublicKey):
            problems.append(f"{label} key is not RSA")
        elif key.key_size < trust.min_rsa_bits:
            problems.append(f"{label} RSA key has {key.key_size} bits < {trust.min_rsa_bits}")
        if _is_ca(c) is not True:
            problems.append(f"{label} is not a CA (basicConstraints)")
    if not isinstance(vek_key, ec.EllipticCurvePublicKey) or not isinstance(vek_key.curve, ec.SECP384R1):
        problems.append(f"{kind} key is not ECDSA P-384")
    if _is_ca(vek):
        problems.append(f"{kind} claims to be a CA")
    for label, c in (("ARK", ark), (inter_label, inter), (kind, vek)):
        if c.version != x509.Version.v3:
            problems.append(f"{label} is not an X.509 v3 certificate")
    log.require(not problems, "chain_keys", f"RSA>={trust.min_rsa_bits} CA certs, {kind} ECDSA P-384",
                "; ".join(problems))
    assert isinstance(ark_key, rsa.RSAPublicKey) and isinstance(inter_key, rsa.RSAPublicKey)
    assert isinstance(vek_key, ec.EllipticCurvePublicKey)

    err = _pss_signed_by(ark, ark_key)
    log.require(err is None, "ark_self_signed", "RSASSA-PSS SHA-384", f"ARK: {err}")
    err = _pss_signed_by(inter, ark_key)
    log.require(err is None, f"{il}_signed_by_ark", "RSASSA-PSS SHA-384", f"{inter_label}: {err}")
    err = _pss_signed_by(vek, inter_key)
    log.require(err is None, "vek_chain", f"{kind} signed by {inter_label} (RSASSA-PSS SHA-384)", f"{kind}: {err}")

    nb = max(c.not_valid_before_utc for c in (ark, inter, vek))
    na = min(c.not_valid_after_utc for c in (ark, inter, vek))
    return VerifiedChain(ark, inter, vek, vek_key, nb, na, tuple(log.checks[start:]))


def verify_chain(ark: x509.Certificate, ark_der: bytes, inter: x509.Certificate, inter_der: bytes,
                 vek: x509.Certificate, vek_der: bytes, *, product: str, kind: str, trust: RootTrust,
                 at: datetime, log: CheckLog) -> VerifiedChain:
    """Verify (or replay a cached verification of) the chain and its validity at ``at``."""
    key = (trust.cache_key, product, kind, ark_der, inter_der, vek_der)
    cached = _chain_cache.get(key)
    if cached is not None and cached.not_before <= at <= cached.not_after:
        for c in cached.checks:
            log.ok(c.name, c.detail + " (cached)")
        chain = cached
    else:
        chain = _verify_uncached(ark, ark_der, inter, inter_der, vek, product=product, kind=kind,
                                 trust=trust, log=log)
    if not chain.not_before <= at <= chain.not_after:
        late = [f"{_cn(c.subject)} valid {c.not_valid_before_utc:%Y-%m-%d %H:%M:%S}Z.."
                f"{c.not_valid_after_utc:%Y-%m-%d %H:%M:%S}Z"
                for c in (chain.ark, chain.intermediate, chain.vek)
                if not c.not_valid_before_utc <= at <= c.not_valid_after_utc]
        log.fail("chain_validity", f"at {at.isoformat()}: " + "; ".join(late))
    log.ok("chain_validity", f"all certificates valid at {at.isoformat()}")
    if cached is None:
        _chain_cache.put(key, chain)
    return chain


def crl_distribution_points(cert: x509.Certificate) -> frozenset[str]:
    """The URIs of ``cert``'s CRL distribution points (where the CRL covering it is published)."""
    try:
        points = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    except x509.ExtensionNotFound:
        return frozenset()
    return frozenset(str(name.value) for point in points for name in (point.full_name or ())
                     if isinstance(name, x509.UniformResourceIdentifier))


def crl_scope(crl: x509.CertificateRevocationList, ark: x509.Certificate) -> frozenset[str]:
    """Where an ARK-signed CRL says it is published: its Issuing Distribution Point when it has one,
    else the ARK's own CRL distribution point (an unscoped CRL is the ARK's CRL, RFC 5280 5.2.5).

    AMD's ARK names the VCEK CRL (``/vcek/v1/{product}/crl``) as its own, and the ASVK names the VLEK
    CRL (``/vlek/v1/{product}/crl``): so the VCEK CRL, unscoped, cannot pass for the one covering
    the ASVK, though both are issued and signed by the same ARK.
    """
    try:
        idp = crl.extensions.get_extension_for_class(x509.IssuingDistributionPoint).value
    except x509.ExtensionNotFound:
        return crl_distribution_points(ark)
    if (idp.only_contains_user_certs or idp.only_contains_attribute_certs or idp.only_some_reasons
            or idp.indirect_crl):
        return frozenset()  # not a complete CRL of the ARK's CA certificates: it covers no ASK/ASVK
    return frozenset(str(name.value) for name in (idp.full_name or ())
                     if isinstance(name, x509.UniformResourceIdentifier))


def crl_covers(crl: x509.CertificateRevocationList, chain: VerifiedChain) -> bool:
    """True when ``crl`` is published where the chain's ASK/ASVK says its revocation is."""
    wanted = crl_distribution_points(chain.intermediate)
    return bool(wanted) and bool(crl_scope(crl, chain.ark) & wanted)


def check_crl(crl: x509.CertificateRevocationList, chain: VerifiedChain, *, at: datetime,
              log: CheckLog) -> str:
    """The CRL must be issued and PSS-signed by the chain's ARK, carry a nextUpdate, be current at ``at``
    (thisUpdate <= at <= nextUpdate) and not list the ASK/ASVK; else a failed "crl" check. Returns what
    was found (for the caller's one "crl" check). Whether it is the CRL *for* that ASK/ASVK is
    ``crl_covers``' question (the caller decides what a CRL of another scope means)."""
    ark = chain.ark
    problems = []
    if crl.issuer != ark.subject:
        problems.append("CRL issuer is not the ARK")
    elif crl.signature_algorithm_oid != SignatureAlgorithmOID.RSASSA_PSS:
        problems.append("CRL is not signed with RSASSA-PSS")
    else:
        key = ark.public_key()
        assert isinstance(key, rsa.RSAPublicKey)
        try:
            key.verify(crl.signature, crl.tbs_certlist_bytes, AMD_PSS, hashes.SHA384())
        except InvalidSignature:
            problems.append("CRL signature does not verify with the ARK")
    if not problems:
        this_update, next_update = crl.last_update_utc, crl.next_update_utc
        if next_update is None:
            problems.append("CRL has no nextUpdate (it could be replayed forever)")
        elif at > next_update:
            problems.append(f"CRL expired at {next_update.isoformat()}")
        if at < this_update:
            problems.append(f"CRL thisUpdate {this_update.isoformat()} is after the verification time {at.isoformat()}")
    if problems:
        log.fail("crl", "; ".join(problems))
    serial = chain.intermediate.serial_number
    revoked = crl.get_revoked_certificate_by_serial_number(serial)
    if revoked is not None:
        log.fail("crl", f"{_cn(chain.intermediate.subject)} serial {serial:#x} is revoked since "
                        f"{revoked.revocation_date_utc.isoformat()}")
    return f"{_cn(chain.intermediate.subject)} serial {serial:#x} not revoked"
