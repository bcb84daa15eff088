"""The two body hashes of a usage record are kept encrypted: the database is the host's.

A request's SHA-256 is what a receipt signs, so the ledger must keep it; in clear it would let the host confirm a
guess of a short or templated prompt (or a one-word answer) by hashing its candidates. Each hash is stored as
AES-256-GCM under a key derived from the platform secrets (``PlatformSecrets.ledger_hash_key``), with a random
96-bit nonce and the row's request id and the column's name as associated data, so a sealed value means nothing
in another row or column. Stored form: URL-safe base64 (no padding) of nonce || ciphertext || tag, 80 characters.
The row MAC (``enclave.row_mac``) covers the hashes in clear, checked after opening.
"""

from __future__ import annotations

import base64
import binascii
import os
import re

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

NONCE_BYTES = 12
SEALED_CHARS = 80   # base64 of 12 + 32 + 16 bytes
_LABEL = b"cube-ai/ledger-hash/v1\x00"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_SEALED = re.compile(r"[A-Za-z0-9_-]{%d}" % SEALED_CHARS)


class HashSeal:
    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("the ledger hash key is 32 bytes")
        self._aead = AESGCM(key)

    @staticmethod
    def _aad(request_id: str, column: str) -> bytes:
        return _LABEL + column.encode("ascii") + b"\x00" + request_id.encode("utf-8")

    def seal(self, digest_hex: str | None, request_id: str, column: str) -> str | None:
        if digest_hex is None:
            return None
        if not _HEX64.fullmatch(digest_hex):
            raise ValueError(f"{column}: not a lowercase hex SHA-256")
        nonce = os.urandom(NONCE_BYTES)
        sealed = nonce + self._aead.encrypt(nonce, bytes.fromhex(digest_hex), self._aad(request_id, column))
        return base64.urlsafe_b64encode(sealed).rstrip(b"=").decode("ascii")

    def open(self, stored: str | None, request_id: str, column: str) -> str | None:
        """The hash in clear; ValueError when ``stored`` is not a value this key sealed for this row and column."""
        if stored is None:
            return None
        if not isinstance(stored, str) or not _SEALED.fullmatch(stored):
            raise ValueError(f"{column}: not a sealed hash")
        try:
            raw = base64.urlsafe_b64decode(stored + "=" * (-len(stored) % 4))
            digest = self._aead.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], self._aad(request_id, column))
        except (binascii.Error, InvalidTag):
            raise ValueError(f"{column}: sealed under another key, row or column") from None
        return digest.hex()
