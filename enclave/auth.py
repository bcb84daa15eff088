"""Bearer PAT authentication, the in-process result cache and the batched last-used tracker."""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Callable
from datetime import datetime

from enclave.access import Principal
from enclave.errors import ApiError, unauthorized
from enclave.store import AuthRecord, Domain, Store, canonical_uuid, utcnow
from enclave.tokens import TokenFormatError, parse_token, token_hash

log = logging.getLogger("enclave.auth")
Clock = Callable[[], datetime]


class MonotonicClock:
    """UTC wall time that never goes backwards: a reading earlier than one already given (or than ``floor``, the
    latest time the store recorded) returns that instead. The guest's clock is the host's to set (kvmclock, NTP
    over the host's network); without this, winding it back made expired keys valid again."""

    def __init__(self, clock: Clock, floor: datetime | None = None) -> None:
        self._clock = clock
        self._high = floor

    def __call__(self) -> datetime:
        now = self._clock()
        if self._high is not None and now < self._high:
            return self._high
        self._high = now
        return now


class GenerationCache:
    """A bounded dict whose entries die whenever the store's write generation moves on.

    Only correct when every identity write goes through this process's Store (SQLite, the embedded default);
    with PostgreSQL replicas it is off unless explicitly enabled.
    """

    def __init__(self, store: Store, *, enabled: bool, max_entries: int = 10_000) -> None:
        self._store = store
        self.enabled = enabled
        self._max = max_entries
        self._entries: dict[str, tuple[int, object]] = {}

    def get(self, key: str) -> object | None:
        if not self.enabled:
            return None
        hit = self._entries.get(key)
        if hit is None or hit[0] != self._store.generation:
            return None
        return hit[1]

    def generation(self) -> int:
        """Take this *before* reading the store and hand it to ``put``."""
        return self._store.generation

    def put(self, key: str, value: object, read_at: int) -> None:
        """Cache ``value`` as read when the generation was ``read_at``: a write that landed while the read
        was in flight (a revocation, say) has moved the generation on, so the entry is born stale."""
        if not self.enabled:
            return
        if len(self._entries) >= self._max:
            self._entries.clear()
        self._entries[key] = (read_at, value)


class LastUsedTracker:
    """Remembers the latest use per PAT in memory; ``flush`` writes them in one batch (periodically and at stop)."""

    def __init__(self, store: Store, *, interval: float) -> None:
        self._store = store
        self._interval = interval
        self._pending: dict[str, datetime] = {}
        self._task: asyncio.Task[None] | None = None

    def mark(self, pat_id: str, when: datetime) -> None:
        self._pending[pat_id] = when

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def flush(self) -> None:
        batch, self._pending = self._pending, {}
        try:
            await self._store.record_last_used(batch)
        except Exception as e:  # never lose data silently; retry with the next flush
            log.warning("could not record PAT last-used times: %s", type(e).__name__)
            for k, v in batch.items():
                self._pending.setdefault(k, v)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.flush()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="pat-last-used")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        await self.flush()


class Authenticator:
    def __init__(self, store: Store, server_secret: bytes, *, tracker: LastUsedTracker, cache: bool,
                 clock: Clock = utcnow, on_failure: Callable[[str], None] | None = None) -> None:
        self._store = store
        self._secret = server_secret
        self._tracker = tracker
        self._cache = GenerationCache(store, enabled=cache)
        self._domains = GenerationCache(store, enabled=cache)
        self._clock = clock
        self._on_failure = on_failure or (lambda reason: None)

    def hash(self, token: str) -> str:
        return token_hash(self._secret, token)

    def _fail(self, reason: str, message: str) -> ApiError:
        self._on_failure(reason)
        return unauthorized(message, reason)

    async def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise self._fail("missing", "Missing API key: send `Authorization: Bearer <personal access token>`.")
        scheme, _, credentials = authorization.partition(" ")
        credentials = credentials.strip()
        if scheme.lower() != "bearer" or not credentials:
            raise self._fail("malformed", "The Authorization header must be `Bearer <personal access token>`.")
        try:
            parse_token(credentials)
        except TokenFormatError as e:
            raise self._fail(e.reason, f"Invalid API key: {e}.") from None
        digest = self.hash(credentials)
        record = self._cache.get(digest)
        if not isinstance(record, AuthRecord):
            read_at = self._cache.generation()
            record = await self._store.find_auth(digest)
            if record is None:
                raise self._fail("unknown", "Invalid API key: unknown or deleted key.")
            self._cache.put(digest, record, read_at)
        if not hmac.compare_digest(record.pat.token_hash, digest):
            raise self._fail("unknown", "Invalid API key: unknown or deleted key.")
        now = self._clock()
        if record.pat.revoked_at is not None:
            raise self._fail("revoked", "Invalid API key: this key has been revoked.")
        if now >= record.pat.expires_at:
            raise self._fail("expired", "Invalid API key: this key has expired.")
        self._tracker.mark(record.pat.id, now)
        return Principal(user=record.user, pat=record.pat, roles=record.roles)

    async def domain(self, ref: str) -> Domain | None:
        """A domain by id (any case) or unique name; cached, so a hit costs no database round trip."""
        domain_id = canonical_uuid(ref)
        key = domain_id or "name:" + ref
        hit = self._domains.get(key)
        if isinstance(hit, Domain):
            return hit
        read_at = self._domains.generation()
        domain = await (self._store.get_domain(domain_id) if domain_id else self._store.get_domain_by_name(ref))
        if domain is not None:
            self._domains.put(key, domain, read_at)
        return domain
