"""The join protocol: how a new replica obtains the platform secrets from a running one.

Two requests on one attested-TLS connection from the joiner J to a running replica S:

1. J connects with the attested client (``attestation.atls.client``) under its join policy: S's certificate
   evidence and fresh evidence for J's nonce are appraised, bound to S's TLS key, *before* J writes a request.
   ``POST /internal/join/v1/challenge`` -> ``{nonce}``: 32 random bytes S remembers (single use, 60 s) together
   with the SPKI of the TLS key the connection is on.
2. J makes an ephemeral X25519 key pair and evidence whose report_data is
   ``SHA-512("cube-ai/join/v1" || SHA-256(S's SPKI, as J verified it) || nonce || J's X25519 public key)``
   (``attestation.peer.join_report_data``), and sends ``POST /internal/join/v1/secrets``
   ``{nonce, public_key, evidence}``. S takes the nonce out of its store (whatever happens next), recomputes
   report_data from *its* key on this connection, the nonce and the public key, and appraises the evidence under
   its join policy. Only when that passes does S answer ``{public_key: S's ephemeral X25519 key, sealed}``:
   the platform secrets encrypted to J's key (X25519, HKDF-SHA-256 over the transcript, ChaCha20-Poly1305 with
   the transcript as associated data). A refusal carries the reason and nothing else.

Why it resists:

* a host replaying a joiner's old evidence: the nonce is S's, fresh and single use, inside report_data;
* a man in the middle relaying to a genuine replica: J only talks over TLS to a key whose evidence passed its
  policy (the host cannot hold such a key), and S checks that the evidence names the SPKI of the connection it
  arrived on, so evidence a genuine joiner made for one replica's connection is refused on any other;
* a replica with another measurement (or configuration, or a debug guest): its evidence fails S's join policy,
  and it learns nothing (no secret is sent before the appraisal passed); symmetrically J refuses, before sending
  anything, a peer that fails *its* join policy, so the host cannot hand a replica secrets of its own choosing;
* a genuine joiner that reaches S through the host's relay: fine, the host sees only TLS, and the secrets are
  additionally encrypted to the ephemeral key whose public half is in J's attested report, so only the code that
  produced that evidence can open them, even if the TLS channel were somehow someone else's.

What it does not stop: the host, which chooses ``--join``, can point a new replica at another genuine replica
that has *other* secrets (a second deployment of the same image and config). The new replica then serves with
those: PATs of the real deployment do not work on it, and rows it finds in a shared database fail their MACs.
That is a denial of service, not a disclosure.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from attestation.errors import AttestationError
from attestation.evidence import MAX_EVIDENCE_BYTES, Evidence, decode_cmw, encode_cmw
from attestation.peer import JOIN_PART_SIZE

VERSION = 1
CHALLENGE_PATH = "/internal/join/v1/challenge"
SECRETS_PATH = "/internal/join/v1/secrets"
JOIN_PATHS = (CHALLENGE_PATH, SECRETS_PATH)
NONCE_TTL_SECONDS = 60.0
MAX_REQUEST_BYTES = 4 * MAX_EVIDENCE_BYTES // 3 + 4096   # base64 evidence plus the small fields
_TRANSCRIPT_LABEL = b"cube-ai/join/v1/transcript"
_KEY_INFO = b"cube-ai/join/v1/secrets"
_AEAD_NONCE = bytes(12)   # the key is fresh per answer (a new ephemeral key each time)
_RAW = serialization.Encoding.Raw, serialization.PublicFormat.Raw


class JoinError(Exception):
    """A join that did not give this replica the platform secrets; the message says why (never a secret)."""


class MessageError(ValueError):
    """A join message that is not well formed; the message names the field."""


def raw_public_key(key: X25519PrivateKey | X25519PublicKey) -> bytes:
    public = key.public_key() if isinstance(key, X25519PrivateKey) else key
    return public.public_bytes(*_RAW)


def transcript(server_spki_sha256: bytes, nonce: bytes, joiner_key: bytes, server_key: bytes) -> bytes:
    """SHA-256 over everything both sides agreed on (each part 32 bytes): the HKDF salt and the AEAD's AAD."""
    return hashlib.sha256(_TRANSCRIPT_LABEL + server_spki_sha256 + nonce + joiner_key + server_key).digest()


def _aead_key(shared: bytes, salt: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=_KEY_INFO).derive(shared)


def _exchange(private: X25519PrivateKey, peer_raw: bytes) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(peer_raw))
    except ValueError:   # a low-order point: no shared secret
        raise MessageError("public_key: not a usable X25519 public key") from None


def seal_for_joiner(plaintext: bytes, *, server_spki_sha256: bytes, nonce: bytes,
                    joiner_key: bytes) -> tuple[bytes, bytes]:
    """(server ephemeral public key, ciphertext) of ``plaintext`` for the joiner's X25519 key."""
    ephemeral = X25519PrivateKey.generate()
    server_key = raw_public_key(ephemeral)
    salt = transcript(server_spki_sha256, nonce, joiner_key, server_key)
    key = _aead_key(_exchange(ephemeral, joiner_key), salt)
    return server_key, ChaCha20Poly1305(key).encrypt(_AEAD_NONCE, plaintext, salt)


def open_from_server(sealed: bytes, *, private: X25519PrivateKey, server_key: bytes, server_spki_sha256: bytes,
                     nonce: bytes) -> bytes:
    """The plaintext of :func:`seal_for_joiner`; JoinError when it was not sealed for this exchange."""
    try:
        shared = _exchange(private, server_key)
    except MessageError as exc:
        raise JoinError(f"the peer's answer: {exc}") from None
    salt = transcript(server_spki_sha256, nonce, raw_public_key(private), server_key)
    try:
        return ChaCha20Poly1305(_aead_key(shared, salt)).decrypt(_AEAD_NONCE, sealed, salt)
    except InvalidTag:
        raise JoinError("the peer's answer was not sealed for this exchange (altered or misrouted)") from None


# -- messages (JSON; bytes as lowercase hex for the fixed-size fields, base64 for the rest) -------------------
def _hex32(data: dict[str, Any], name: str) -> bytes:
    value = data.get(name)
    if not isinstance(value, str) or len(value) != 2 * JOIN_PART_SIZE:
        raise MessageError(f"{name}: expected {2 * JOIN_PART_SIZE} hexadecimal characters")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise MessageError(f"{name}: expected {2 * JOIN_PART_SIZE} hexadecimal characters") from None


def _b64(data: dict[str, Any], name: str, limit: int) -> bytes:
    value = data.get(name)
    if not isinstance(value, str) or not value or len(value) > 4 * limit // 3 + 4:
        raise MessageError(f"{name}: expected base64 of at most {limit} bytes")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise MessageError(f"{name}: not base64") from None


def _object(body: bytes, keys: set[str]) -> dict[str, Any]:
    if len(body) > MAX_REQUEST_BYTES:
        raise MessageError(f"message larger than {MAX_REQUEST_BYTES} bytes")
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError):   # deep nesting exhausts the decoder's stack
        raise MessageError("not a JSON object") from None
    if not isinstance(data, dict):
        raise MessageError("not a JSON object")
    if set(data) != keys:
        raise MessageError(f"expected exactly the fields {', '.join(sorted(keys))}")
    if data.get("v") != VERSION:
        raise MessageError(f"v: this replica speaks join protocol version {VERSION}")
    return data


@dataclass(frozen=True)
class Challenge:
    nonce: bytes
    server_spki_sha256: bytes

    def to_json(self) -> dict[str, Any]:
        return {"v": VERSION, "nonce": self.nonce.hex(), "server_spki_sha256": self.server_spki_sha256.hex(),
                "expires_in": NONCE_TTL_SECONDS}

    @classmethod
    def parse(cls, body: bytes) -> "Challenge":
        data = _object(body, {"v", "nonce", "server_spki_sha256", "expires_in"})
        return cls(_hex32(data, "nonce"), _hex32(data, "server_spki_sha256"))


@dataclass(frozen=True)
class SecretsRequest:
    nonce: bytes
    public_key: bytes
    evidence: Evidence

    def to_bytes(self) -> bytes:
        return json.dumps({"v": VERSION, "nonce": self.nonce.hex(), "public_key": self.public_key.hex(),
                           "evidence": base64.b64encode(encode_cmw(self.evidence)).decode()}).encode()

    @classmethod
    def parse(cls, body: bytes) -> "SecretsRequest":
        data = _object(body, {"v", "nonce", "public_key", "evidence"})
        nonce, public_key = _hex32(data, "nonce"), _hex32(data, "public_key")
        try:
            evidence = decode_cmw(_b64(data, "evidence", MAX_EVIDENCE_BYTES))
        except AttestationError as exc:
            raise MessageError(f"evidence: {exc}") from None
        return cls(nonce, public_key, evidence)


@dataclass(frozen=True)
class SecretsAnswer:
    public_key: bytes
    sealed: bytes

    def to_json(self) -> dict[str, Any]:
        return {"v": VERSION, "public_key": self.public_key.hex(), "sealed": base64.b64encode(self.sealed).decode()}

    @classmethod
    def parse(cls, body: bytes) -> "SecretsAnswer":
        data = _object(body, {"v", "public_key", "sealed"})
        return cls(_hex32(data, "public_key"), _b64(data, "sealed", 4096))
