"""Checks and verdicts: what every verification step reports and what a caller finally reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Check:
    """One step of verification or appraisal, with a reason a human can act on."""

    name: str
    ok: bool
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail}


class CheckLog:
    """Accumulates checks; ``fail`` raises so verification stops at the first failure (fail closed)."""

    def __init__(self) -> None:
        self.checks: list[Check] = []

    def ok(self, name: str, detail: str = "") -> None:
        self.checks.append(Check(name, True, detail))

    def fail(self, name: str, detail: str) -> None:
        from .errors import VerificationError

        self.checks.append(Check(name, False, detail))
        raise VerificationError(f"{name}: {detail}", self.checks)

    def require(self, condition: bool, name: str, ok_detail: str, fail_detail: str) -> None:
        if condition:
            self.ok(name, ok_detail)
        else:
            self.fail(name, fail_detail)


@dataclass
class VerifiedEvidence:
    """What verify() proved about a report or quote, before any policy is applied.

    ``platform`` is "snp", "tdx" or "sim"; ``claims`` uses the key names and value
    formats of ../shared/vectors/expected.json (hex strings for byte fields).
    ``tcb_status`` is the Intel TCB status when collateral was evaluated (TDX), else None.
    """

    platform: str
    product: str | None
    claims: dict[str, Any]
    checks: list[Check] = field(default_factory=list)
    tcb_status: str | None = None
    advisory_ids: list[str] = field(default_factory=list)
    collateral_issued_at: Any = None  # datetime of the oldest collateral used, for max-age policies
    # A current CRL covering the chain was checked (SNP: the ASK/ASVK's; TDX: the PCK and root CA CRLs).
    revocation_checked: bool = False


@dataclass
class Verdict:
    """The final answer: accepted or refused, with every check that led there."""

    ok: bool
    platform: str | None
    product: str | None
    status: str
    claims: dict[str, Any]
    checks: list[Check]
    error: str | None = None
    revocation_checked: bool = False  # from VerifiedEvidence: revocation is known, not assumed

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "platform": self.platform,
            "product": self.product,
            "status": self.status,
            "claims": self.claims,
            "checks": [c.to_json() for c in self.checks],
            "error": self.error,
        }
