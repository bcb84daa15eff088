"""The single entry point: Evidence + Policy -> Verdict.  Never raises for bad evidence.

Verdict.status words:
- TDX with collateral evaluated: the Intel TCB status ("UpToDate", "OutOfDate", ...), whether the
  verdict is ok or refused by policy;
- "verified"  signatures, chains and every policy rule passed;
- "refused"   the evidence verified but a policy rule failed (or the platform is not allowed);
- "invalid"   a signature, chain, binding or TCB check failed (VerificationError);
- "malformed" the report, quote, certificates or bundle could not be parsed;
- "collateral_unavailable" certificates or collateral needed for verification were missing;
- "error"     anything else (an internal fault; fails closed).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric import ec

from .appraise import appraise
from .errors import AttestationError, CollateralError, EvidenceError, ParseError, VerificationError
from .evidence import SNP_CRL_FILE, TDX_CCEL_FILE, Evidence
from .policy import DEFAULT_POLICY, Policy
from .verdict import Check, CheckLog, Verdict, VerifiedEvidence

if TYPE_CHECKING:  # pragma: no cover
    from .snp.kds import KdsClient
    from .tdx.collateral import Collateral
    from .tdx.pcs import PcsClient

log = logging.getLogger(__name__)


def _refused(platform: str | None, product: str | None, status: str, checks: list[Check], error: str) -> Verdict:
    return Verdict(ok=False, platform=platform, product=product, status=status, claims={}, checks=checks, error=error)


def split_snp_certificates(certs: tuple[bytes, ...]) -> tuple[bytes | None, list[bytes]]:
    """Evidence certificates (VEK, ASK|ASVK, ARK; any may be missing) -> (vek, chain).

    The VEK is the one certificate with an EC key; the others (RSA) form the chain.
    """
    vek: bytes | None = None
    chain: list[bytes] = []
    for i, der in enumerate(certs):
        from .snp.certs import load_certificate

        try:
            # load_certificate decodes every lazily parsed field (attestation.x509parse), so damaged
            # DER is a ParseError here and public_key() below cannot raise.
            cert = load_certificate(der)
        except AttestationError as exc:
            raise ParseError(f"certificates[{i}]: {exc}") from None
        key = cert.public_key()
        if isinstance(key, ec.EllipticCurvePublicKey):
            if vek is not None:
                raise ParseError("certificates: more than one VCEK/VLEK (EC) certificate")
            vek = der
        else:
            chain.append(der)
    return vek, chain


# -- parsed TDX collateral, cached by content ------------------------------------------------------
# Parsing a bundle's collateral (TCB info and QE identity JSON, two PEM chains, up to three CRLs) costs
# ~300 us; the host agent's /v1/verify and the attested client see the same bundle again and again.
# Only successful parses are cached, keyed by SHA-256 over every name and every byte of every file
# handed in; a Collateral is a frozen dataclass over those exact bytes with read-only parsed views.
# Signatures, chains and CRLs are still checked on every verification (attestation.tdx.verify).
COLLATERAL_CACHE_ENTRIES = 32
COLLATERAL_CACHE_BYTES = 8 << 20  # bound on the file bytes held (bundles arrive from clients)
_COLLATERAL_KEY_LABEL = b"cube-ai/collateral-cache/v1\0"
_collateral_cache: "OrderedDict[bytes, Collateral]" = OrderedDict()
_collateral_cache_lock = threading.Lock()


def collateral_cache_key(files: Mapping[str, bytes]) -> bytes:
    """SHA-256 over every (name, bytes) pair in name order, each length-prefixed (no two inputs share an encoding)."""
    digest = hashlib.sha256(_COLLATERAL_KEY_LABEL)
    for name in sorted(files):
        raw_name, data = name.encode("utf-8"), files[name]
        digest.update(len(raw_name).to_bytes(4, "big") + raw_name + len(data).to_bytes(8, "big"))
        digest.update(data)
    return digest.digest()


def clear_collateral_cache() -> None:
    """Forget every cached Collateral (for tests and cold benchmarks)."""
    with _collateral_cache_lock:
        _collateral_cache.clear()


def cached_collateral(files: Mapping[str, bytes]) -> "Collateral":
    """collateral_from_files(files), reusing the parse of a byte-identical bundle seen recently."""
    from .tdx.collateral import collateral_from_files

    if not isinstance(files, Mapping) or not all(
        type(name) is str and type(data) is bytes for name, data in files.items()
    ):
        return collateral_from_files(files)  # not cacheable as given: let the parser say why
    snapshot = dict(files)  # hash and parse the very same bytes
    key = collateral_cache_key(snapshot)
    with _collateral_cache_lock:
        hit = _collateral_cache.get(key)
        if hit is not None:
            _collateral_cache.move_to_end(key)
            return hit
    collateral = collateral_from_files(snapshot)  # raises on bad bytes: failures are never cached
    size = sum(len(data) for _, data in collateral.files)
    if size > COLLATERAL_CACHE_BYTES:
        return collateral
    with _collateral_cache_lock:
        _collateral_cache[key] = collateral
        _collateral_cache.move_to_end(key)
        held = sum(len(data) for c in _collateral_cache.values() for _, data in c.files)
        while len(_collateral_cache) > COLLATERAL_CACHE_ENTRIES or held > COLLATERAL_CACHE_BYTES:
            _, evicted = _collateral_cache.popitem(last=False)
            held -= sum(len(data) for _, data in evicted.files)
    return collateral


def _verify(evidence: Evidence, policy: Policy, at: datetime | None, kds, pcs) -> VerifiedEvidence:
    if evidence.platform in ("snp", "sim"):
        from .snp.verify import verify_report

        vek, chain = split_snp_certificates(evidence.certificates)
        # Any AMD CRL the evidence carries is checked (a report proves nothing about revocation); with
        # snp.require_crl one covering the chain's ASK/ASVK must be there (or come from ``kds``).
        crls = tuple(v for k, v in evidence.collateral.items() if k == SNP_CRL_FILE)
        check_crl = policy.snp.require_crl
        if evidence.platform == "sim":
            from .sim import sim_trust

            assert policy.sim_root_fingerprint is not None  # checked by the caller
            return verify_report(evidence.report, vek=vek, chain=chain, product=evidence.product, at=at,
                                 trust=sim_trust(policy.sim_root_fingerprint), check_crl=check_crl, crls=crls)
        return verify_report(evidence.report, vek=vek, chain=chain, product=evidence.product, at=at, kds=kds,
                             check_crl=check_crl, crls=crls)
    if evidence.platform == "tdx":
        from .tdx.verify import verify_quote

        files = {name: data for name, data in evidence.collateral.items() if name != TDX_CCEL_FILE}
        collateral = cached_collateral(files) if files else None
        verified = verify_quote(evidence.report, collateral=collateral, at=at, pcs=pcs)
        ccel = evidence.collateral.get(TDX_CCEL_FILE)
        if ccel is not None:
            _replay_event_log(verified, ccel)
        return verified
    raise EvidenceError(f"unknown platform {evidence.platform!r}")


def _replay_event_log(verified: VerifiedEvidence, ccel: bytes) -> None:
    """Replay the evidence's CC event log against the verified quote's RTMRs; refuse any mismatch.

    The log comes from the (untrusted) host's side of the evidence: only a replay to the signed RTMRs
    gives its events meaning.  On success its events and boot state join the claims.
    """
    from .tdx.eventlog import parse_event_log, replay_claims, replay_mismatches

    log = parse_event_log(ccel)  # ParseError: the bundle is malformed
    try:
        rtmrs = tuple(bytes.fromhex(verified.claims[f"rtmr{i}"]) for i in range(4))
    except (KeyError, TypeError, ValueError):
        raise ParseError("the quote's RTMRs are missing from its claims") from None
    checks = CheckLog()
    checks.checks = list(verified.checks)
    mismatches = replay_mismatches(log, rtmrs)  # type: ignore[arg-type]
    checks.require(not mismatches, "eventlog_replay", f"{len(log.events)} CC event log events replay to the quote's RTMR0-3",
                   "CC event log does not replay to the quote's " + ", ".join(m.upper() for m in mismatches))
    verified.checks = checks.checks
    verified.claims.update(replay_claims(log))


def verify_evidence(
    evidence: Evidence,
    *,
    policy: Policy = DEFAULT_POLICY,
    at: datetime | None = None,
    expected_report_data: bytes | None = None,
    kds: "KdsClient | None" = None,
    pcs: "PcsClient | None" = None,
) -> Verdict:
    """Verify evidence for its platform, then appraise it against ``policy``.

    Simulated evidence is verified only against ``sim_trust(policy.sim_root_fingerprint)`` and only
    when the policy lists "sim"; AMD's roots never vouch for it and its root never vouches for SNP.
    """
    if not isinstance(evidence, Evidence):
        return _refused(None, None, "malformed", [Check("evidence", False, "not an Evidence object")],
                        "evidence: not an Evidence object")
    platform = evidence.platform
    if platform not in policy.platforms:
        check = Check("platform_allowed", False,
                      f"platform {platform} is not allowed by policy {policy.name!r} (allows {', '.join(policy.platforms)})")
        return _refused(platform, evidence.product, "refused", [check], f"refused by policy: {check.detail}")
    pre: list[Check] = []
    if platform == "sim":
        # Policy validation guarantees a fingerprint when sim is allowed; say which root is trusted.
        pre.append(Check("sim_root", True, f"simulated platform trusted only through root {policy.sim_root_fingerprint}"))
    try:
        verified = _verify(evidence, policy, at, kds, pcs)
    except VerificationError as exc:
        return _refused(platform, evidence.product, "invalid", pre + list(exc.checks), str(exc))
    except (ParseError, EvidenceError) as exc:
        return _refused(platform, evidence.product, "malformed", pre + [Check("parse", False, str(exc))], str(exc))
    except CollateralError as exc:
        return _refused(platform, evidence.product, "collateral_unavailable",
                        pre + [Check("collateral", False, str(exc))], str(exc))
    except AttestationError as exc:
        return _refused(platform, evidence.product, "error", pre + [Check("verification", False, str(exc))], str(exc))
    except Exception as exc:  # fail closed on any fault in a parser or verifier
        log.exception("internal error while verifying %s evidence", platform)
        detail = f"internal error: {type(exc).__name__}"
        return _refused(platform, evidence.product, "error", pre + [Check("verification", False, detail)], detail)
    if verified.platform != platform:
        detail = f"evidence says {platform} but verification produced {verified.platform}"
        return _refused(platform, evidence.product, "invalid", pre + list(verified.checks) + [Check("platform", False, detail)], detail)
    verdict = appraise(verified, policy, expected_report_data=expected_report_data, at=at)
    verdict.checks = pre + verdict.checks
    return verdict
