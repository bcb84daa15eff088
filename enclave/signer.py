"""The enclave's attested signing key: made in memory at startup, bound to fresh evidence, never stored.

Receipts and audit checkpoints are signed with it (``attestation.signing`` says how and how a verifier checks).
Each process (each replica) has its own key; its evidence travels with everything it signs, so a verifier needs
only the statement and a policy.
"""

from __future__ import annotations

import dataclasses
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from attestation.errors import ProviderError
from attestation.evidence import Evidence, encode_cmw
from attestation.providers import EvidenceProvider
from attestation.signing import NONCE_SIZE, key_id, signed_message, signing_binding, signing_report_data


@dataclass(frozen=True)
class SignerIdentity:
    """What a verifier needs besides the signature: the public key, its name and the evidence binding it."""

    key_id: str
    public_key_der: bytes
    evidence: Evidence
    evidence_cbor: bytes


class AttestedSigner:
    def __init__(self, provider: EvidenceProvider) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        spki = self._key.public_key().public_bytes(serialization.Encoding.DER,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
        nonce = secrets.token_bytes(NONCE_SIZE)
        evidence = provider.get_evidence(signing_report_data(spki, nonce))
        if not isinstance(evidence, Evidence):
            raise ProviderError("evidence provider returned something that is not Evidence")
        evidence = dataclasses.replace(evidence, binding=signing_binding(nonce))
        self.identity = SignerIdentity(key_id=key_id(spki), public_key_der=spki, evidence=evidence,
                                       evidence_cbor=encode_cmw(evidence))
        self._lock = threading.Lock()

    def sign(self, purpose: str, message: bytes) -> bytes:
        """ECDSA P-256 / SHA-256 (DER) over ``purpose || 0x00 || message``."""
        with self._lock:
            return self._key.sign(signed_message(purpose, message), ec.ECDSA(hashes.SHA256()))


class SignerSource:
    """The signer, made on first use: evidence costs a device call (a third of a second on the simulated platform),
    which a process that never signs should not pay at startup. Thread-safe; ``make`` runs once when it succeeds."""

    def __init__(self, make: Callable[[], AttestedSigner]) -> None:
        self._make = make
        self._signer: AttestedSigner | None = None
        self._lock = threading.Lock()

    def get(self) -> AttestedSigner:
        if self._signer is None:
            with self._lock:
                if self._signer is None:
                    self._signer = self._make()
        return self._signer

    @classmethod
    def of(cls, signer: AttestedSigner) -> "SignerSource":
        source = cls(lambda: signer)
        source._signer = signer
        return source
