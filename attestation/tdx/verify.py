"""verify_quote: a TDX DCAP quote -> VerifiedEvidence, every step a named check (fail closed).

Without collateral: header, PCK chain to the pinned Intel SGX Root CA, QE report signature and binding,
Intel's TD QE and TDX module by pinned identity (MRSIGNER / MRSIGNERSEAM), quote signature. With collateral:
also the TCB info / QE identity signatures and freshness, CRLs, the TDX module and QE identities and the
QVL-style TCB evaluation.

Time-independent results (chain signatures, collateral signatures, CRL signatures) are cached by the exact
bytes they cover; the time checks are re-run on every call, so a cached entry can never outlive validity.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from ..errors import CollateralError
from ..verdict import CheckLog, VerifiedEvidence
from . import quote as quote_mod
from . import pck as pck_mod
from . import chain as chain_mod
from .chain import ChainError, VerifiedChain, VerifiedCrl, check_crl_time, check_not_revoked, check_validity
from .collateral import Collateral, QeIdentity, TcbInfo
from .quote import Quote, parse_quote, quote_claims
from .tcb import check_platform_match, check_qe_identity, check_tdx_module, evaluate_tcb
from . import trust as trust_mod
from .trust import TCB_SIGNING_CN

if TYPE_CHECKING:
    from .pcs import PcsClient

_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())
_CACHE_LIMIT = 512


@dataclass(frozen=True)
class _VerifiedCollateral:
    tcb_chain: VerifiedChain
    qe_chain: VerifiedChain
    root_crl: VerifiedCrl | None


_pck_chains: dict[bytes, VerifiedChain] = {}
_collaterals: dict[tuple, _VerifiedCollateral] = {}
_pck_crls: dict[tuple, VerifiedCrl] = {}


def clear_caches() -> None:
    """Forget every cached verification result (for tests and cold benchmarks)."""
    _pck_chains.clear()
    _collaterals.clear()
    _pck_crls.clear()
    quote_mod.load_pck_chain.cache_clear()
    quote_mod._leaf_issuer_cn.cache_clear()
    pck_mod._extension_of_der.cache_clear()
    chain_mod._fingerprint.cache_clear()


def _remember(cache: dict, key, value) -> None:
    if len(cache) >= _CACHE_LIMIT:
        cache.clear()
    cache[key] = value


def _utc(at: datetime | None) -> datetime:
    if at is None:
        return datetime.now(timezone.utc)
    if at.tzinfo is None:
        return at.replace(tzinfo=timezone.utc)
    return at.astimezone(timezone.utc)


def _ecdsa_ok(key: ec.EllipticCurvePublicKey, rs: bytes, message: bytes) -> bool:
    signature = encode_dss_signature(int.from_bytes(rs[:32], "big"), int.from_bytes(rs[32:], "big"))
    try:
        key.verify(signature, message, _ECDSA_SHA256)
    except InvalidSignature:
        return False
    return True


# ---------------------------------------------------------------------------------------------- PCK chain


def _check_pck_chain(log: CheckLog, q: Quote, at: datetime) -> VerifiedChain:
    pem = q.sig_data.pck_chain_pem
    verified = _pck_chains.get(pem)
    if verified is None:
        try:
            verified = pck_mod.verify_pck_chain_structure(q.sig_data.pck_chain)
        except ChainError as exc:
            log.fail("pck_chain", str(exc))
        _remember(_pck_chains, pem, verified)
    try:
        check_validity(verified, at)
    except ChainError as exc:
        log.fail("pck_chain", str(exc))
    log.ok("pck_chain", f"PCK leaf <- {quote_mod.pck_issuer_cn(q)} <- pinned Intel SGX Root CA")
    return verified


# ---------------------------------------------------------------------------------------------- collateral


def _verify_signed_document(log: CheckLog, check: str, what: str, issuer_chain: tuple[x509.Certificate, ...],
                            document: TcbInfo | QeIdentity, known: VerifiedChain | None = None) -> VerifiedChain:
    """Issuer chain up to a TCB Signing leaf, then the document's signature; ``known``: a chain already verified."""
    if known is not None and issuer_chain == known.certs:  # PCS signs both documents with the same certificate
        chain = known
    else:
        try:
            chain = chain_mod.verify_chain_structure(issuer_chain, leaf_cns=(TCB_SIGNING_CN,))
        except ChainError as exc:
            log.fail(check, f"{what} issuer chain: {exc}")
    if not _ecdsa_ok(chain.certs[0].public_key(), document.signature, document.raw_body):
        log.fail(check, f"{what} signature does not verify with the Intel SGX TCB Signing key")
    return chain


def _verify_collateral_signatures(log: CheckLog, c: Collateral) -> _VerifiedCollateral:
    tcb_chain = _verify_signed_document(log, "tcb_info_signature", "TCB info", c.tcb_info_chain, c.tcb_info)
    qe_chain = _verify_signed_document(log, "qe_identity_signature", "QE identity", c.qe_identity_chain,
                                       c.qe_identity, known=tcb_chain)
    root_crl = None
    if c.root_ca_crl is not None:
        try:
            root_crl = chain_mod.verify_crl(c.root_ca_crl, c.root_ca_crl_der, tcb_chain.certs[-1], "root CA CRL")
        except ChainError as exc:
            log.fail("root_ca_crl", str(exc))
    return _VerifiedCollateral(tcb_chain, qe_chain, root_crl)


def _check_collateral(log: CheckLog, c: Collateral, at: datetime, check_crl: bool) -> _VerifiedCollateral:
    verified = _collaterals.get(c.files)
    if verified is None:
        verified = _verify_collateral_signatures(log, c)
        _remember(_collaterals, c.files, verified)
    for name, ch in (("tcb_info_signature", verified.tcb_chain), ("qe_identity_signature", verified.qe_chain)):
        try:
            check_validity(ch, at)
        except ChainError as exc:
            log.fail(name, f"issuer chain: {exc}")
    log.ok("tcb_info_signature", f"TCB info (FMSPC {c.fmspc}) signed by Intel SGX TCB Signing")
    log.ok("qe_identity_signature", "QE identity signed by Intel SGX TCB Signing")
    for name, item in (("tcb_info_validity", c.tcb_info), ("qe_identity_validity", c.qe_identity)):
        label = "TCB info" if item is c.tcb_info else "QE identity"
        if at < item.issue_date:
            log.fail(name, f"{label} issued {item.issue_date.isoformat()}, after {at.isoformat()}")
        if at > item.next_update:
            log.fail(name, f"{label} expired at nextUpdate {item.next_update.isoformat()} (checked at {at.isoformat()})")
        log.ok(name, f"{label} current ({item.issue_date.date()} .. {item.next_update.date()})")
    if check_crl:
        if verified.root_crl is None:
            raise CollateralError("collateral has no root_ca.crl (needed for revocation checks)")
        try:
            check_crl_time(verified.root_crl, at, "root CA CRL")
            for cert in (verified.tcb_chain.certs[0], verified.qe_chain.certs[0]):
                check_not_revoked(verified.root_crl, cert, "root CA CRL")
        except ChainError as exc:
            log.fail("root_ca_crl", str(exc))
        log.ok("root_ca_crl", "TCB signing certificates not revoked by the root CA CRL")
    return verified


def _check_pck_crl(
    log: CheckLog, q: Quote, chain: VerifiedChain, c: Collateral, vc: _VerifiedCollateral, at: datetime
) -> None:
    ca = pck_mod.pck_ca_kind(chain.certs)
    crl = c.pck_crl(ca)
    if crl is None:
        raise CollateralError(f"collateral has no pck_crl_{ca}.crl (needed for revocation checks)")
    key = (q.sig_data.pck_chain_pem, c.files, ca)
    verified = _pck_crls.get(key)
    try:
        if verified is None:
            verified = chain_mod.verify_crl(crl, c.pck_crl_der(ca), chain.certs[1], f"PCK {ca} CRL")
            _remember(_pck_crls, key, verified)
        check_crl_time(verified, at, f"PCK {ca} CRL")
        check_not_revoked(verified, chain.certs[0], f"PCK {ca} CRL")
        assert vc.root_crl is not None
        check_not_revoked(vc.root_crl, chain.certs[1], "root CA CRL")
    except ChainError as exc:
        log.fail("pck_crl", str(exc))
    log.ok("pck_crl", f"PCK certificate and its CA not revoked (PCK {ca} CRL, root CA CRL)")


# ---------------------------------------------------------------------------------------------- quote


def _check_qe_report(log: CheckLog, q: Quote, chain: VerifiedChain) -> None:
    sd = q.sig_data
    log.require(
        _ecdsa_ok(chain.certs[0].public_key(), sd.qe_report_signature, sd.qe_report.raw),
        "qe_report_signature",
        "QE report signed by the PCK key",
        "QE report signature does not verify with the PCK certificate key",
    )
    expected = hashlib.sha256(sd.attestation_key + sd.qe_auth_data).digest()
    report_data = sd.qe_report.report_data
    log.require(
        hmac.compare_digest(report_data[:32], expected) and report_data[32:] == bytes(32),
        "qe_report_binding",
        "QE report data = SHA-256(attestation key || QE auth data) || zeros",
        "QE report data does not bind the attestation key and QE authentication data",
    )


def _check_pinned_identities(log: CheckLog, q: Quote) -> None:
    """Without collateral nothing else says the QE and the TDX module are Intel's: a QE of another signer holding
    a PCK-certified key (any enclave granted PROVISIONKEY can obtain one) could sign any TD report."""
    qe = q.sig_data.qe_report
    problems = []
    if not hmac.compare_digest(qe.mrsigner, trust_mod.INTEL_TD_QE_MRSIGNER):
        problems.append(f"QE MRSIGNER {qe.mrsigner.hex()} is not Intel's TD QE signer")
    if qe.isvprodid != trust_mod.INTEL_TD_QE_ISVPRODID:
        problems.append(f"QE ISVPRODID {qe.isvprodid} is not {trust_mod.INTEL_TD_QE_ISVPRODID} (TD_QE)")
    if qe.attributes[0] & 0x02:
        problems.append("the QE runs in debug mode")
    log.require(not problems, "qe_identity", "QE is Intel's TD QE (pinned MRSIGNER, ISVPRODID 2, not debug)",
                "; ".join(problems))
    body = q.body
    log.require(
        body.mrsignerseam == trust_mod.INTEL_TDX_MODULE_MRSIGNER and body.seam_attributes == bytes(8),
        "tdx_module",
        "TDX module is Intel's (MRSIGNERSEAM and SEAMATTRIBUTES zero)",
        f"TDX module is not Intel's: MRSIGNERSEAM {body.mrsignerseam.hex()}, "
        f"SEAMATTRIBUTES {body.seam_attributes.hex()}",
    )


def _check_quote_signature(log: CheckLog, q: Quote) -> None:
    sd = q.sig_data
    try:
        key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + sd.attestation_key)
    except ValueError:
        log.fail("quote_signature", "attestation key is not a valid P-256 point")
    log.require(
        _ecdsa_ok(key, sd.signature, q.signed_bytes),
        "quote_signature",
        f"quote signed by the attestation key over bytes 0..{q.signed_length}",
        "quote signature does not verify with the attestation key",
    )


def verify_quote(
    quote: bytes | Quote,
    *,
    collateral: Collateral | None = None,
    at: datetime | None = None,
    pcs: "PcsClient | None" = None,
    check_crl: bool = True,
) -> VerifiedEvidence:
    """Verify a TDX quote; raises VerificationError (with .checks), ParseError or CollateralError."""
    at = _utc(at)
    # A Quote object is re-derived from its raw bytes: the parsed fields reported as claims must be the ones
    # the signatures cover, whatever was done to the object (parsing is cheap; the PEM chain is cached).
    q = parse_quote(quote.raw if isinstance(quote, Quote) else quote)
    log = CheckLog()
    log.ok(
        "header",
        f"DCAP v{q.header.version} TDX quote, body type {q.body_type}, Intel QE, ECDSA P-256 attestation key",
    )
    if pcs is not None:
        # The verifier's own source replaces what the evidence carries: the host assembles evidence and could
        # attach superseded documents (Intel-signed, before their nextUpdate), or a fresh TCB info beside a PCK
        # CRL from before a revocation; every object is independently signed, so they mix.
        collateral = pcs.collateral(q.pck_extension.fmspc.hex(), ca=pck_mod.pck_ca_kind(q.sig_data.pck_chain))
    vc = _check_collateral(log, collateral, at, check_crl) if collateral is not None else None
    chain = _check_pck_chain(log, q, at)
    if collateral is not None and check_crl:
        assert vc is not None
        _check_pck_crl(log, q, chain, collateral, vc, at)
    module = None
    if collateral is not None:
        check_platform_match(log, q.pck_extension, collateral.tcb_info)
        module = check_tdx_module(log, q, collateral.tcb_info)
    _check_qe_report(log, q, chain)
    qe_status, qe_advisories = ("", ())
    if collateral is not None:
        qe_status, qe_advisories = check_qe_identity(log, q.sig_data.qe_report, collateral.qe_identity)
    else:
        _check_pinned_identities(log, q)
    _check_quote_signature(log, q)
    claims = quote_claims(q)
    evidence = VerifiedEvidence(platform="tdx", product=None, claims=claims, checks=log.checks)
    if collateral is not None:
        evaluation = evaluate_tcb(log, q, collateral.tcb_info, module, qe_status, qe_advisories)
        evidence.tcb_status = evaluation.status
        evidence.advisory_ids = list(evaluation.advisory_ids)
        evidence.collateral_issued_at = collateral.issued_at
        evidence.revocation_checked = check_crl
        claims["tcb_date"] = evaluation.tcb_date
        claims["tcb_evaluation_data_number"] = evaluation.tcb_evaluation_data_number
        claims["qe_identity_tcb_evaluation_data_number"] = collateral.qe_identity.tcb_evaluation_data_number
        claims["tdx_module_id"] = evaluation.module_id
        claims["platform_tcb_status"] = evaluation.platform_status
        claims["tdx_module_tcb_status"] = evaluation.module_status
        claims["qe_tcb_status"] = evaluation.qe_status
        evidence.checks = log.checks
    return evidence
