"""Sealing a secret (the bootstrap PAT) to an operator's X25519 public key, so that only the operator opens it.

Format ``cube-sealed-v1.`` + base64url (no padding) of ``ephemeral public key (32) || ciphertext || tag (16)``:

* ``shared = X25519(ephemeral private, operator public)``
* ``key = HKDF-SHA256(shared, salt = ephemeral public || operator public, info = "cube-ai/sealed/v1", 32 bytes)``
* ``ciphertext || tag = ChaCha20-Poly1305(key, nonce = 12 zero bytes, aad = "cube-sealed-v1")``

The key is fresh per message (a new ephemeral key each time), so the fixed nonce is never reused under one key.
Public keys are given as the base64 of the 32 raw bytes, or as PEM (SubjectPublicKeyInfo); private keys as PEM
(PKCS#8) or the base64 of the 32 raw bytes.
"""

from __future__ import annotations

import base64
import binascii

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

VERSION = "cube-sealed-v1"
_PREFIX = VERSION + "."
_INFO = b"cube-ai/sealed/v1"
_NONCE = bytes(12)
_RAW = serialization.Encoding.Raw, serialization.PublicFormat.Raw


class SealError(ValueError):
    """A key or a sealed blob that cannot be used; the message says why."""


def _b64decode(text: str) -> bytes:
    text = text.strip()
    try:
        return base64.urlsafe_b64decode(text.replace("+", "-").replace("/", "_") + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise SealError("not base64") from None


def load_public_key(text: str) -> X25519PublicKey:
    """An X25519 public key from base64 (32 raw bytes) or PEM."""
    if "-----BEGIN" in text:
        try:
            key = serialization.load_pem_public_key(text.encode())
        except ValueError:
            raise SealError("not a PEM public key") from None
        if not isinstance(key, X25519PublicKey):
            raise SealError("not an X25519 public key")
        return key
    raw = _b64decode(text)
    if len(raw) != 32:
        raise SealError(f"an X25519 public key is 32 bytes, this is {len(raw)}")
    return X25519PublicKey.from_public_bytes(raw)


def load_private_key(data: bytes) -> X25519PrivateKey:
    """An X25519 private key from PEM (PKCS#8) or base64 (32 raw bytes)."""
    if b"-----BEGIN" in data:
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError):
            raise SealError("not an unencrypted PEM private key") from None
        if not isinstance(key, X25519PrivateKey):
            raise SealError("not an X25519 private key")
        return key
    raw = _b64decode(data.decode("ascii", "replace"))
    if len(raw) != 32:
        raise SealError(f"an X25519 private key is 32 bytes, this is {len(raw)}")
    return X25519PrivateKey.from_private_bytes(raw)


def public_key_text(key: X25519PublicKey) -> str:
    """The base64 form of a public key, as the config takes it."""
    return base64.b64encode(key.public_bytes(*_RAW)).decode()


def _key(shared: bytes, ephemeral: bytes, recipient: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=ephemeral + recipient, info=_INFO).derive(shared)


def seal(plaintext: bytes, recipient: X25519PublicKey) -> str:
    ephemeral = X25519PrivateKey.generate()
    eph_pub = ephemeral.public_key().public_bytes(*_RAW)
    key = _key(ephemeral.exchange(recipient), eph_pub, recipient.public_bytes(*_RAW))
    sealed = ChaCha20Poly1305(key).encrypt(_NONCE, plaintext, VERSION.encode())
    return _PREFIX + base64.urlsafe_b64encode(eph_pub + sealed).decode().rstrip("=")


def open_sealed(text: str, private_key: X25519PrivateKey) -> bytes:
    """The plaintext of ``seal``; SealError when the blob is malformed or sealed to another key."""
    text = text.strip()
    if not text.startswith(_PREFIX):
        raise SealError(f"not a sealed blob (expected it to start with {_PREFIX!r})")
    raw = _b64decode(text[len(_PREFIX):])
    if len(raw) < 32 + 16:
        raise SealError("sealed blob too short")
    eph_pub, sealed = raw[:32], raw[32:]
    recipient = private_key.public_key().public_bytes(*_RAW)
    try:
        shared = private_key.exchange(X25519PublicKey.from_public_bytes(eph_pub))
    except ValueError:   # a low-order ephemeral point: no shared secret
        raise SealError("sealed blob carries an invalid ephemeral key") from None
    key = _key(shared, eph_pub, recipient)
    try:
        return ChaCha20Poly1305(key).decrypt(_NONCE, sealed, VERSION.encode())
    except InvalidTag:
        raise SealError("this blob was not sealed to this key (or was altered)") from None
