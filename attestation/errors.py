"""The one error hierarchy of the attestation library; nothing else escapes its public functions."""

from __future__ import annotations


class AttestationError(Exception):
    """Base of every error the attestation library raises."""


class ParseError(AttestationError):
    """Bytes that are not a well-formed report, quote, certificate, collateral or bundle."""


class BootStateError(AttestationError):
    """An event log that replays, but from which no trustworthy boot state can be read (duplicate separator)."""


class EvidenceError(AttestationError):
    """An evidence bundle (CBOR CMW) that is malformed, too large or inconsistent."""


class VerificationError(AttestationError):
    """A signature, certificate chain, binding or collateral check failed.

    ``checks`` carries the checks made up to and including the failing one, so a
    caller can show the whole story of a refusal.
    """

    def __init__(self, message: str, checks: list | None = None) -> None:
        super().__init__(message)
        self.checks = list(checks or [])


class CollateralError(AttestationError):
    """Collateral (AMD certificates/CRLs, Intel TCB info, QE identity, CRLs) missing or unusable."""


class FetchError(CollateralError):
    """A network fetch from AMD KDS, Intel PCS or a collateral cache failed.

    ``status`` is the last HTTP status met (None when no answer came); ``reason`` is "status" (an
    unwanted HTTP status), "unreachable" (transport error), "too_large" (body over the cap) or None
    (anything else, such as an unusable body).
    """

    def __init__(self, message: str, *, status: int | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


class PolicyError(AttestationError):
    """A policy file that does not validate (names the bad key and why)."""


class ProviderError(AttestationError):
    """Evidence could not be obtained on this machine (no device, kernel refused, race)."""


class NoSealingKey(ProviderError):
    """This platform has no hardware sealing key (TDX): secrets must come from an attested peer instead."""
