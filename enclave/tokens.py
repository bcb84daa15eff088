"""Personal access token format: ``cube_pat_`` + 36 base62 secret characters + 6 base62 CRC32 checksum.

The secret carries log2(62) * 36 ~= 214 bits from the OS CSPRNG. The checksum (CRC32 of the prefix and secret,
base62, fixed width) lets secret scanners recognise real tokens and lets the service refuse a mistyped token
offline, before any database lookup. At rest only HMAC-SHA-256(server secret, token) is kept.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import zlib
from dataclasses import dataclass

PAT_PREFIX = "cube_pat_"
SECRET_LENGTH = 36
CHECKSUM_LENGTH = 6
TOKEN_LENGTH = len(PAT_PREFIX) + SECRET_LENGTH + CHECKSUM_LENGTH
BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# Anything shaped like one of our tokens, wherever it appears in text (used by the log redactor).
PAT_PATTERN = re.compile(re.escape(PAT_PREFIX) + r"[0-9A-Za-z]{8,}")
_BODY = re.compile(r"[0-9A-Za-z]+")


class TokenFormatError(ValueError):
    """The presented string is not a well-formed Cube AI PAT; ``reason`` is a short machine-readable word."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ParsedToken:
    token: str
    secret: str
    checksum: str

    @property
    def last4(self) -> str:
        return self.token[-4:]


def _base62(value: int, width: int) -> str:
    chars = []
    for _ in range(width):
        value, rem = divmod(value, 62)
        chars.append(BASE62[rem])
    return "".join(reversed(chars))


def checksum(prefix_and_secret: str) -> str:
    return _base62(zlib.crc32(prefix_and_secret.encode("ascii")), CHECKSUM_LENGTH)


def generate_token() -> str:
    secret = "".join(secrets.choice(BASE62) for _ in range(SECRET_LENGTH))
    return PAT_PREFIX + secret + checksum(PAT_PREFIX + secret)


def parse_token(text: str) -> ParsedToken:
    """Check prefix, length, alphabet and checksum; raise TokenFormatError otherwise. No I/O."""
    if not isinstance(text, str):
        raise TokenFormatError("malformed", "the API key must be a string")
    if not text.startswith(PAT_PREFIX):
        raise TokenFormatError("malformed", f"the API key is not a Cube AI personal access token ({PAT_PREFIX}...)")
    if len(text) != TOKEN_LENGTH:
        raise TokenFormatError("malformed", "the API key has the wrong length")
    body = text[len(PAT_PREFIX):]
    if not _BODY.fullmatch(body):
        raise TokenFormatError("malformed", "the API key contains characters outside [0-9A-Za-z]")
    secret, check = body[:SECRET_LENGTH], body[SECRET_LENGTH:]
    if not hmac.compare_digest(checksum(PAT_PREFIX + secret), check):
        raise TokenFormatError("bad_checksum", "the API key checksum does not match (mistyped or truncated key)")
    return ParsedToken(token=text, secret=secret, checksum=check)


def token_hash(server_secret: bytes, token: str) -> str:
    """Keyed hash used as the database lookup key (hex)."""
    return hmac.new(server_secret, token.encode("ascii"), hashlib.sha256).hexdigest()
