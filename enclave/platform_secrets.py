"""The platform secrets one deployment's replicas share, and the keys derived from them.

``root`` is the only secret value: 32 random bytes made by the first replica inside the enclave, kept on disk
only sealed (``enclave.sealed_state``) and handed to a new replica only over a mutually attested channel
(``enclave.join``). Every working key is derived from it with HKDF-SHA-256 under its own label, so a key used for
one job (PAT lookup hashes, row MACs, sealed ledger hashes) never serves another.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

ROOT_BYTES = 32
MIN_ROOT_BYTES = 32
FORMAT = b"cube-platform-secrets/v1\x00"
PAT_HMAC_LABEL = b"cube-ai/pat-hmac/v1"
ROW_MAC_LABEL = b"cube-ai/row-mac/v1"
LEDGER_HASH_LABEL = b"cube-ai/ledger-hash/v1"


class PlatformSecretsError(ValueError):
    """Bytes that are not a platform-secrets encoding; the message says why."""


def _derive(root: bytes, label: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label).derive(root)


@dataclass(frozen=True, repr=False)
class PlatformSecrets:
    root: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.root, bytes) or len(self.root) < MIN_ROOT_BYTES:
            raise PlatformSecretsError(f"the root secret must be at least {MIN_ROOT_BYTES} bytes")

    def __repr__(self) -> str:   # never print the secret
        return "PlatformSecrets(<secret>)"

    @classmethod
    def generate(cls) -> "PlatformSecrets":
        return cls(secrets.token_bytes(ROOT_BYTES))

    def pat_hmac_key(self) -> bytes:
        """The key of the PAT lookup hash (``enclave.tokens.token_hash``)."""
        return _derive(self.root, PAT_HMAC_LABEL)

    def row_mac_key(self) -> bytes:
        """The key of the MACs on security-relevant rows."""
        return _derive(self.root, ROW_MAC_LABEL)

    def ledger_hash_key(self) -> bytes:
        """The key sealing the body hashes of usage records (``enclave.usage.hash_seal``)."""
        return _derive(self.root, LEDGER_HASH_LABEL)

    def to_bytes(self) -> bytes:
        return FORMAT + self.root

    @classmethod
    def from_bytes(cls, data: bytes) -> "PlatformSecrets":
        if not data.startswith(FORMAT):
            raise PlatformSecretsError("not a platform-secrets encoding (unknown format)")
        return cls(bytes(data[len(FORMAT):]))
