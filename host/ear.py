"""EAR (EAT Attestation Result, draft-ietf-rats-ear) built from a Verdict and signed as an ES256 JWT.

The result is **advisory**: it is signed by the host agent, and the host is not trusted. It tells an
operator or a constrained client what the host concluded; a client that can verify evidence itself
(the attested-TLS client) should do so and not rely on this token.

Shape (JSON claims)::

    {
      "eat_profile": "tag:github.com,2023:veraison/ear",
      "iat": 1767225600,
      "exp": 1767225900,                                                # iat + lifetime (default 300 s)
      "ear.verifier-id": {"developer": "cube-ai", "build": "cube-host 0.1.0"},
      "eat_nonce": "<the caller's nonce, echoed verbatim>",            # when one was given
      "submods": {
        "cpu0": {
          "ear.status": "affirming" | "warning" | "contraindicated",
          "ear.trustworthiness-vector": {"instance-identity": 2, "configuration": 2,
                                         "executables": 0, "hardware": 2},
          "ear.appraisal-policy-id": "cube-ai:policy:<name>",
          "ear.cube-ai.claims": {"platform": "snp", "product": "Milan", "verdict": "verified",
                                 "tcb_status": null, "evidence": {...claims...},
                                 "checks": [...], "error": null}
        }
      },
      "ear.cube-ai.advisory": "signed by the untrusted host agent; verify evidence yourself where you can"
    }

Status mapping: refused -> contraindicated; affirming only when the policy is *measured* for the platform
(``Policy.is_measured``: the whole boot chain pinned; never simulated evidence), every check passed with the
TCB UpToDate (SNP, which has no TCB status: every check passed) and revocation was checked (a current CRL
covering the chain); accepted otherwise -> warning: the policy pins no (or only a firmware) measurement, the
TCB status is one the policy tolerates other than UpToDate, TDX was verified without TCB evaluation (no
collateral), or SNP without a CRL covering its ASK/ASVK.

``exp`` is ``iat`` plus a short lifetime (``verify.ear_lifetime_seconds``, default 300 s): a result is about
evidence at one moment, not a standing credential; ``verify_ear`` requires and checks it.

Trustworthiness vector (AR4SI values: 0 no claim, 2 affirming, 32 warning, 96 contraindicated,
99 cryptographic validation failed), each claim derived from the verdict's checks:
  instance-identity  signatures and certificate chains (report/quote signature, VEK/PCK chain, pinned
                     root, QE binding); 99 when one failed, 96 when a certificate is revoked (CRL);
  hardware           TCB checks (TCB level/status, VEK-TCB match, minimum TCB and launch TCB, SEV firmware
                     version, PLATFORM_INFO, TDX module); 32 when an accepted but not up-to-date TCB, 96 when refused;
  configuration      guest policy / TD attributes (debug, migration agent, SMT, VMPL, guest POLICY bits,
                     TDATTRIBUTES bits, XFAM, SEPT_VE_DISABLE, host data, REPORT_DATA binding, signing key, platform);
  executables        launch measurement (MEASUREMENT / MRTD+RTMRs), ID block (ID/author key, family/image id),
                     guest SVN, service TD: 0 when the policy is not measured (the boot chain was not compared
                     with approved builds).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from attestation.keyfile import read_private_file
from attestation.policy import Policy
from attestation.verdict import Verdict

EAR_PROFILE = "tag:github.com,2023:veraison/ear"
EAR_MEDIA_TYPE = 'application/eat+jwt; eat_profile="tag:github.com,2023:veraison/ear"'
SUBMOD = "cpu0"
ADVISORY = "signed by the untrusted host agent; clients that can should verify the evidence themselves"
KEY_FILE = "ear-signing-key.pem"
DEFAULT_LIFETIME_SECONDS = 300.0

AFFIRMING, WARNING, CONTRAINDICATED = "affirming", "warning", "contraindicated"

# AR4SI trustworthiness claim values
NO_CLAIM, TV_AFFIRMING, TV_WARNING, TV_CONTRAINDICATED, TV_CRYPTO_FAILED = 0, 2, 32, 96, 99

_IDENTITY = {"report_signature", "quote_signature", "qe_report_signature", "qe_identity_signature",
             "tcb_info_signature", "vek_chain", "pck_chain", "ark_pinned", "chain_certificates",
             "chain_validity", "chip_id_matches_vek", "product", "report_format", "sim_root", "parse",
             "evidence", "crl", "pck_crl", "root_ca_crl", "qe_identity", "collateral", "verification",
             "platform"}
_REVOCATION = {"crl", "pck_crl", "root_ca_crl"}
_NOT_CRYPTO = {"product", "report_format", "parse", "evidence", "collateral", "verification", "platform"}
_HARDWARE = {"tcb_level", "tcb_status", "tcb_matches_vek", "tcb_not_above_current", "min_tcb", "tdx_module",
             "min_tee_tcb_svn", "collateral_present", "collateral_age", "min_pcesvn", "min_qe_isvsvn",
             "min_launch_tcb", "min_firmware", "platform_info", "min_tcb_evaluation_data_number"}
_EXECUTABLES = {"measurement", "min_guest_svn", "service_td", "id_key_digest", "author_key_digest", "family_id",
                "image_id"}
_CONFIGURATION = {"debug_disabled", "guest_policy", "migrate_ma", "smt", "vmpl", "host_data", "td_attributes",
                  "td_attributes_reserved", "sept_ve_disable", "report_data", "signing_key", "platform_allowed",
                  "mrconfigid", "mrowner", "guest_policy_bits", "td_attributes_bits", "xfam"}


def _tcb_short(verdict: Verdict) -> bool:
    """Accepted with a TCB below UpToDate, TDX with no TCB evaluation at all (no collateral), or revocation not
    checked (SNP without a CRL covering its chain): nothing then says the platform's keys are not revoked."""
    if not verdict.revocation_checked:
        return True
    if verdict.status == "verified":
        return verdict.platform == "tdx"
    return verdict.status != "UpToDate"


def ear_status(verdict: Verdict, policy: Policy | None) -> str:
    """contraindicated / warning / affirming (see the module docstring); without a measured policy, at most warning."""
    if not verdict.ok:
        return CONTRAINDICATED
    if policy is None or not policy.is_measured(verdict.platform):
        return WARNING  # any image on genuine hardware would have passed: nothing affirms the software
    return WARNING if _tcb_short(verdict) else AFFIRMING


def trustworthiness_vector(verdict: Verdict, policy: Policy | None = None) -> dict[str, int]:
    checks = verdict.checks
    vector: dict[str, int] = {}

    def band(names: set[str]) -> int:
        relevant = [c for c in checks if c.name in names]
        if not relevant:
            return NO_CLAIM
        return TV_CONTRAINDICATED if any(not c.ok for c in relevant) else TV_AFFIRMING

    identity = [c for c in checks if c.name in _IDENTITY]
    failed_identity = [c for c in identity if not c.ok]
    if any(c.name in _REVOCATION for c in failed_identity):
        vector["instance-identity"] = TV_CONTRAINDICATED
    elif any(c.name not in _NOT_CRYPTO for c in failed_identity):
        vector["instance-identity"] = TV_CRYPTO_FAILED
    elif failed_identity:
        vector["instance-identity"] = TV_CONTRAINDICATED
    elif any(c.ok and c.name not in _NOT_CRYPTO for c in identity):
        vector["instance-identity"] = TV_AFFIRMING
    else:
        vector["instance-identity"] = NO_CLAIM

    hardware = band(_HARDWARE)
    if hardware == NO_CLAIM and verdict.ok and verdict.platform == "snp":
        hardware = TV_AFFIRMING  # VEK chain to AMD's root: genuine part, TCB bound by the VEK (sim: no hardware)
    if hardware == TV_AFFIRMING and verdict.ok and _tcb_short(verdict):
        hardware = TV_WARNING  # TCB below UpToDate, not evaluated (TDX without collateral), or revocation unknown
    vector["hardware"] = hardware
    vector["configuration"] = band(_CONFIGURATION)
    vector["executables"] = band(_EXECUTABLES)
    if verdict.ok and not (policy is not None and policy.is_measured(verdict.platform)):
        vector["executables"] = NO_CLAIM  # the boot chain was not compared against approved measurements
    # Unknown check names that failed still have to show up somewhere.
    known = _IDENTITY | _HARDWARE | _EXECUTABLES | _CONFIGURATION
    if any(not c.ok and c.name not in known for c in checks) and vector["configuration"] != TV_CONTRAINDICATED:
        vector["configuration"] = TV_CONTRAINDICATED
    return vector


def build_ear(verdict: Verdict, *, policy_name: str, nonce: str | None, developer: str, build: str,
              policy: Policy | None = None, now: float | None = None,
              lifetime: float = DEFAULT_LIFETIME_SECONDS) -> dict[str, Any]:
    if not lifetime > 0:
        raise ValueError("EAR lifetime must be positive")
    issued = int(now if now is not None else time.time())
    submod: dict[str, Any] = {
        "ear.status": ear_status(verdict, policy),
        "ear.trustworthiness-vector": trustworthiness_vector(verdict, policy),
        "ear.appraisal-policy-id": f"cube-ai:policy:{policy_name}",
        "ear.cube-ai.claims": {
            "platform": verdict.platform,
            "product": verdict.product,
            "verdict": verdict.status,
            "tcb_status": verdict.status if verdict.status not in (
                "verified", "refused", "invalid", "malformed", "collateral_unavailable", "error") else None,
            "evidence": verdict.claims,
            "checks": [c.to_json() for c in verdict.checks],
            "error": verdict.error,
        },
    }
    claims: dict[str, Any] = {
        "eat_profile": EAR_PROFILE,
        "iat": issued,
        "exp": issued + max(1, int(lifetime)),
        "ear.verifier-id": {"developer": developer, "build": build},
        "submods": {SUBMOD: submod},
        "ear.cube-ai.advisory": ADVISORY,
    }
    if nonce is not None:
        claims["eat_nonce"] = nonce
    return claims


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@dataclass
class EarSigner:
    """The agent's ES256 key: created once, persisted 0600 in the data directory."""

    key: ec.EllipticCurvePrivateKey

    @classmethod
    def load_or_create(cls, data_dir: Path) -> "EarSigner":
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = data_dir / KEY_FILE
        if not path.exists():
            key = ec.generate_private_key(ec.SECP256R1())
            pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:  # another process won the race: use its key
                pass
            else:
                with os.fdopen(fd, "wb") as f:
                    f.write(pem)
        # refused, not tightened, when loose: a key others could read may already have leaked
        key = serialization.load_pem_private_key(read_private_file(path, "EAR signing key"), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
            raise ValueError(f"{path}: not a P-256 EC private key")
        return cls(key)

    def public_jwk(self) -> dict[str, str]:
        numbers = self.key.public_key().public_numbers()
        jwk = {"crv": "P-256", "kty": "EC",
               "x": _b64url(numbers.x.to_bytes(32, "big")), "y": _b64url(numbers.y.to_bytes(32, "big"))}
        return {**jwk, "kid": jwk_thumbprint(jwk), "alg": "ES256", "use": "sig"}

    @property
    def kid(self) -> str:
        return self.public_jwk()["kid"]

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        return {"keys": [self.public_jwk()]}

    def sign(self, claims: dict[str, Any]) -> str:
        return jwt.encode(claims, self.key, algorithm="ES256", headers={"kid": self.kid, "typ": "JWT"})


def jwk_thumbprint(jwk: dict[str, str]) -> str:
    """RFC 7638 thumbprint (SHA-256) of an EC public JWK."""
    required = {k: jwk[k] for k in ("crv", "kty", "x", "y")}
    canonical = json.dumps(required, separators=(",", ":"), sort_keys=True).encode()
    return _b64url(hashlib.sha256(canonical).digest())


def verify_ear(token: str, jwks: dict[str, Any], *, leeway: float = 0.0, nonce: str | None = None) -> dict[str, Any]:
    """Check an EAR JWT against a JWKS (by kid), its expiry and the EAR profile; returns the claims.

    ``nonce``: the nonce the caller sent with its request; the token's ``eat_nonce`` must be exactly it (else
    a result issued for someone else's request, or replayed within its lifetime, would pass). Raises
    jwt.InvalidTokenError on any failure (jwt.ExpiredSignatureError once ``exp`` has passed, a
    MissingRequiredClaimError without one). Useful for operators and tests; remember the result is only
    as trustworthy as the host that signed it.
    """
    header = jwt.get_unverified_header(token)
    if header.get("alg") != "ES256":
        raise jwt.InvalidAlgorithmError("EAR must be signed with ES256")
    for key in jwks.get("keys", []):
        if key.get("kid") == header.get("kid"):
            public = jwt.algorithms.ECAlgorithm.from_jwk(json.dumps(key))
            claims = jwt.decode(token, public, algorithms=["ES256"], leeway=leeway,
                                options={"require": ["iat", "exp"], "verify_exp": True, "verify_iat": True})
            if claims.get("eat_profile") != EAR_PROFILE:
                raise jwt.InvalidTokenError("not an EAR (eat_profile)")
            if nonce is not None:
                echoed = claims.get("eat_nonce")
                if not isinstance(echoed, str) or not hmac.compare_digest(echoed.encode(), nonce.encode()):
                    raise jwt.InvalidTokenError("the EAR's eat_nonce is not the nonce of this request (replayed?)")
            return claims
    raise jwt.InvalidKeyError("no key in the JWKS matches the token's kid")
