"""MACs on the security-relevant rows of the store, so the host cannot forge, edit or swap them.

Each MAC is HMAC-SHA-256 under ``PlatformSecrets.row_mac_key()`` over the canonical JSON array
``[format, table, primary key..., fields...]`` (ASCII-only, no spaces; times as integer microseconds since the
epoch in UTC; lists as JSON arrays; absent values as null). A JSON array is unambiguous, so no two different
rows encode alike; the table name keeps a row from moving to another table, the primary key from being
swapped with another row. The fields are everything an access decision reads:

* users: id, name, is_superadmin
* domains: id, name, model_allowlist
* memberships: domain_id, user_id, role
* pats: id, user_id, domain_id, token_hash, scopes, model_allowlist, expires_at, revoked_at, issued_by
  (not last_used_at, name or last4: bookkeeping the host may scribble on without gaining anything)

What per-row MACs cannot see: a deleted row (e.g. a membership: the user loses rights, never gains), and an
older copy of a row put back (e.g. a PAT row from before its revocation, a user row from before a demotion) or
of the whole database. See docs/sealed-state.md for what limits that.
"""

from __future__ import annotations

import calendar
import hmac
import json
from collections.abc import Sequence
from datetime import UTC, datetime

FORMAT = "cube-row-mac/v1"
MAC_HEX_CHARS = 64

Value = str | bool | int | None | datetime | Sequence[str]


def _micros(value: datetime) -> int:
    """Microseconds since the epoch, exactly (no float), for an aware or a naive-UTC datetime."""
    aware = value.replace(tzinfo=UTC) if value.tzinfo is None else value
    return calendar.timegm(aware.utctimetuple()) * 1_000_000 + aware.microsecond


def _canonical(value: Value) -> object:
    if value is None or value.__class__ in _PLAIN:
        return value
    if isinstance(value, datetime):
        return {"t": _micros(value)}
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    if isinstance(value, (str, bool, int)):   # subclasses of the plain types
        return value
    raise TypeError(f"no canonical encoding for a {type(value).__name__} in a MAC'd row")


_ENCODER = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"))
_PLAIN = (str, bool, int)


def encode(table: str, values: Sequence[Value]) -> bytes:
    """The canonical bytes a row's MAC covers."""
    return _ENCODER.encode([FORMAT, table, *[_canonical(v) for v in values]]).encode("ascii")


class RowMac:
    """Computes and checks row MACs under one key (never logged, never stored)."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes) or len(key) < 32:
            raise ValueError("the row MAC key must be at least 32 bytes")
        self._key = key

    def __repr__(self) -> str:
        return "RowMac(<key>)"

    def mac(self, table: str, values: Sequence[Value]) -> str:
        return hmac.digest(self._key, encode(table, values), "sha256").hex()

    def valid(self, table: str, values: Sequence[Value], mac: str | None) -> bool:
        """Whether ``mac`` is this row's; False also for values no row of ours can hold (no encoding)."""
        if not isinstance(mac, str) or len(mac) != MAC_HEX_CHARS or not mac.isascii():   # compare_digest: ASCII only
            return False
        try:
            expected = self.mac(table, values)
        except TypeError:   # e.g. a JSON number in a list of strings, written by the host
            return False
        return hmac.compare_digest(expected, mac)
