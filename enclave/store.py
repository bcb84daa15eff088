"""Identity store: users, domains, memberships and PATs over SQLAlchemy 2 async (SQLite or PostgreSQL).

Migrations (enclave/migrations) run at open. ``generation`` increases on every write made through this Store so
an in-process cache of authentication results can tell it is stale (see enclave.auth).
"""

from __future__ import annotations

import os
import re
import ssl
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import event
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from enclave.schema import domains, memberships, pats, users

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
ROLES = ("admin", "member")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_UUID_ANY_CASE = re.compile(_UUID.pattern, re.IGNORECASE)


class StoreError(Exception):
    pass


class Conflict(StoreError):
    """A uniqueness rule was violated (e.g. a name already taken)."""


def utcnow() -> datetime:
    return datetime.now(UTC)


def canonical_uuid(value: str) -> str | None:
    """The canonical (lower-case) form of an id written in any case; None when ``value`` is not a UUID."""
    if _UUID.fullmatch(value):          # the common case, on the hot path: already canonical
        return value
    return value.lower() if _UUID_ANY_CASE.fullmatch(value) else None


def _aware(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


@dataclass(frozen=True)
class User:
    id: str
    name: str
    is_superadmin: bool
    created_at: datetime


@dataclass(frozen=True)
class Domain:
    id: str
    name: str
    model_allowlist: tuple[str, ...] | None
    created_at: datetime


@dataclass(frozen=True)
class Member:
    domain_id: str
    user: User
    role: str
    created_at: datetime


@dataclass(frozen=True)
class Pat:
    id: str
    user_id: str
    domain_id: str | None
    name: str
    token_hash: str
    last4: str
    scopes: tuple[str, ...]
    model_allowlist: tuple[str, ...] | None
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None
    issued_by: str | None = None   # the user who minted it (the owner for self-made keys; None: deleted issuer)


class Owner:
    """The type of ``OWNER``: ``create_pat``'s default issuer, the key's owner (None means a deleted issuer)."""


OWNER = Owner()


@dataclass(frozen=True)
class AuthRecord:
    """Everything an access decision needs about a PAT, loaded in one go."""
    pat: Pat
    user: User
    roles: Mapping[str, str] = field(default_factory=dict)   # domain_id -> role


def _user(row: Any) -> User:
    return User(id=row.id, name=row.name, is_superadmin=bool(row.is_superadmin), created_at=_aware(row.created_at))


def _domain(row: Any) -> Domain:
    allow = row.model_allowlist
    return Domain(id=row.id, name=row.name, model_allowlist=tuple(allow) if allow is not None else None,
                  created_at=_aware(row.created_at))


def _pat(row: Any) -> Pat:
    allow = row.model_allowlist
    return Pat(id=row.id, user_id=row.user_id, domain_id=row.domain_id, name=row.name, token_hash=row.token_hash,
               last4=row.last4, scopes=tuple(row.scopes or ()),
               model_allowlist=tuple(allow) if allow is not None else None,
               created_at=_aware(row.created_at), expires_at=_aware(row.expires_at),
               revoked_at=_aware(row.revoked_at), last_used_at=_aware(row.last_used_at), issued_by=row.issued_by)


def _upgrade(connection: sa.Connection) -> None:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["connection"] = connection
    command.upgrade(cfg, "head")


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cur = dbapi_connection.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


class Store:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.generation = 0

    @classmethod
    async def open(cls, url: str, *, schema: str | None = None, migrate: bool = True,
                   tls: ssl.SSLContext | None = None) -> "Store":
        """``tls``: PostgreSQL over TLS with this context (enclave.database_tls pins the server)."""
        kwargs: dict[str, Any] = {}
        if tls is not None:
            if url.startswith("sqlite"):
                raise StoreError("TLS is for a PostgreSQL database")
            kwargs["connect_args"] = {"ssl": tls}
        if url.startswith("sqlite"):
            path = url.split(":///", 1)[1] if ":///" in url else ""
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                # PAT hashes live here: owner-only, created so before SQLite opens it.
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        elif schema:
            kwargs.setdefault("connect_args", {})["server_settings"] = {"search_path": schema}
        engine = create_async_engine(url, pool_pre_ping=not url.startswith("sqlite"), **kwargs)
        if url.startswith("sqlite"):
            event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        store = cls(engine)
        if migrate:
            try:
                async with engine.begin() as conn:
                    if schema and not url.startswith("sqlite"):
                        await conn.execute(sa.text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
                    await conn.run_sync(_upgrade)
            except BaseException:
                await engine.dispose()
                raise
        return store

    async def close(self) -> None:
        await self.engine.dispose()

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))

    async def _write(self, stmt: Any) -> sa.CursorResult:
        try:
            async with self.engine.begin() as conn:
                result = await conn.execute(stmt)
        except IntegrityError as e:
            raise Conflict(str(e.orig).splitlines()[0] if e.orig else "conflict") from None
        self.generation += 1
        return result

    async def _rows(self, stmt: Any) -> Sequence[Any]:
        async with self.engine.connect() as conn:
            return (await conn.execute(stmt)).all()

    # users
    async def create_user(self, name: str, *, is_superadmin: bool = False) -> User:
        user = User(id=str(uuid.uuid4()), name=name, is_superadmin=is_superadmin, created_at=utcnow())
        await self._write(users.insert().values(id=user.id, name=name, is_superadmin=is_superadmin,
                                                created_at=user.created_at))
        return user

    async def get_user(self, user_id: str) -> User | None:
        rows = await self._rows(users.select().where(users.c.id == user_id))
        return _user(rows[0]) if rows else None

    async def get_user_by_name(self, name: str) -> User | None:
        rows = await self._rows(users.select().where(users.c.name == name))
        return _user(rows[0]) if rows else None

    async def list_users(self) -> list[User]:
        return [_user(r) for r in await self._rows(users.select().order_by(users.c.name))]

    async def count_users(self) -> int:
        rows = await self._rows(sa.select(sa.func.count()).select_from(users))
        return int(rows[0][0])

    async def count_superadmins(self) -> int:
        rows = await self._rows(sa.select(sa.func.count()).select_from(users).where(users.c.is_superadmin.is_(True)))
        return int(rows[0][0])

    async def update_user(self, user_id: str, *, name: str | None = None,
                          is_superadmin: bool | None = None) -> User | None:
        values: dict[str, Any] = {}
        if name is not None:
            values["name"] = name
        if is_superadmin is not None:
            values["is_superadmin"] = is_superadmin
        if values:
            await self._write(users.update().where(users.c.id == user_id).values(**values))
        return await self.get_user(user_id)

    async def delete_user(self, user_id: str) -> bool:
        return (await self._write(users.delete().where(users.c.id == user_id))).rowcount > 0

    # domains
    async def create_domain(self, name: str, *, model_allowlist: Iterable[str] | None = None) -> Domain:
        allow = list(model_allowlist) if model_allowlist is not None else None
        domain = Domain(id=str(uuid.uuid4()), name=name, model_allowlist=tuple(allow) if allow is not None else None,
                        created_at=utcnow())
        await self._write(domains.insert().values(id=domain.id, name=name, model_allowlist=allow,
                                                  created_at=domain.created_at))
        return domain

    async def get_domain(self, domain_id: str) -> Domain | None:
        rows = await self._rows(domains.select().where(domains.c.id == domain_id))
        return _domain(rows[0]) if rows else None

    async def get_domain_by_name(self, name: str) -> Domain | None:
        rows = await self._rows(domains.select().where(domains.c.name == name))
        return _domain(rows[0]) if rows else None

    async def list_domains(self, ids: Iterable[str] | None = None) -> list[Domain]:
        stmt = domains.select().order_by(domains.c.name)
        if ids is not None:
            stmt = stmt.where(domains.c.id.in_(list(ids)))
        return [_domain(r) for r in await self._rows(stmt)]

    async def update_domain(self, domain_id: str, *, name: str | None = None,
                            model_allowlist: Iterable[str] | None = None, clear_allowlist: bool = False
                            ) -> Domain | None:
        values: dict[str, Any] = {}
        if name is not None:
            values["name"] = name
        if clear_allowlist:
            values["model_allowlist"] = None
        elif model_allowlist is not None:
            values["model_allowlist"] = list(model_allowlist)
        if values:
            await self._write(domains.update().where(domains.c.id == domain_id).values(**values))
        return await self.get_domain(domain_id)

    async def delete_domain(self, domain_id: str) -> bool:
        return (await self._write(domains.delete().where(domains.c.id == domain_id))).rowcount > 0

    # memberships
    async def set_membership(self, domain_id: str, user_id: str, role: str) -> Member:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}")
        now = utcnow()
        try:
            async with self.engine.begin() as conn:
                updated = await conn.execute(memberships.update().where(
                    (memberships.c.domain_id == domain_id) & (memberships.c.user_id == user_id)).values(role=role))
                if updated.rowcount == 0:
                    await conn.execute(memberships.insert().values(domain_id=domain_id, user_id=user_id, role=role,
                                                                   created_at=now))
        except IntegrityError as e:
            raise Conflict(str(e.orig).splitlines()[0] if e.orig else "conflict") from None
        self.generation += 1
        member = await self.get_member(domain_id, user_id)
        assert member is not None
        return member

    async def get_member(self, domain_id: str, user_id: str) -> Member | None:
        members = await self.list_members(domain_id, user_id=user_id)
        return members[0] if members else None

    async def list_members(self, domain_id: str, *, user_id: str | None = None) -> list[Member]:
        stmt = (sa.select(memberships.c.role, memberships.c.created_at.label("joined_at"), users)
                .join(users, users.c.id == memberships.c.user_id)
                .where(memberships.c.domain_id == domain_id).order_by(users.c.name))
        if user_id is not None:
            stmt = stmt.where(memberships.c.user_id == user_id)
        return [Member(domain_id=domain_id, user=_user(r), role=r.role, created_at=_aware(r.joined_at))
                for r in await self._rows(stmt)]

    async def remove_membership(self, domain_id: str, user_id: str) -> bool:
        result = await self._write(memberships.delete().where(
            (memberships.c.domain_id == domain_id) & (memberships.c.user_id == user_id)))
        return result.rowcount > 0

    async def roles_of(self, user_id: str) -> dict[str, str]:
        rows = await self._rows(sa.select(memberships.c.domain_id, memberships.c.role)
                                .where(memberships.c.user_id == user_id))
        return {r.domain_id: r.role for r in rows}

    # personal access tokens
    async def create_pat(self, *, user_id: str, name: str, token_hash: str, last4: str, scopes: Iterable[str],
                         expires_at: datetime, domain_id: str | None = None,
                         model_allowlist: Iterable[str] | None = None, issued_by: str | None | Owner = OWNER
                         ) -> Pat:
        """``issued_by``: who minted the key (default: its owner; None: an issuer since deleted)."""
        allow = list(model_allowlist) if model_allowlist is not None else None
        pat = Pat(id=str(uuid.uuid4()), user_id=user_id, domain_id=domain_id, name=name, token_hash=token_hash,
                  last4=last4, scopes=tuple(scopes), model_allowlist=tuple(allow) if allow is not None else None,
                  created_at=utcnow(), expires_at=_aware(expires_at), revoked_at=None, last_used_at=None,
                  issued_by=user_id if isinstance(issued_by, Owner) else issued_by)
        await self._write(pats.insert().values(
            id=pat.id, user_id=user_id, domain_id=domain_id, name=name, token_hash=token_hash, last4=last4,
            scopes=list(pat.scopes), model_allowlist=allow, created_at=pat.created_at, expires_at=pat.expires_at,
            issued_by=pat.issued_by))
        return pat

    async def get_pat(self, pat_id: str) -> Pat | None:
        rows = await self._rows(pats.select().where(pats.c.id == pat_id))
        return _pat(rows[0]) if rows else None

    async def list_pats(self, *, user_id: str | None = None, domain_id: str | None = None) -> list[Pat]:
        stmt = pats.select().order_by(pats.c.created_at, pats.c.id)
        if user_id is not None:
            stmt = stmt.where(pats.c.user_id == user_id)
        if domain_id is not None:
            stmt = stmt.where(pats.c.domain_id == domain_id)
        return [_pat(r) for r in await self._rows(stmt)]

    async def list_issued_for_others(self, issuer_id: str) -> list[Pat]:
        """The keys ``issuer_id`` minted for other users (revoked ones included)."""
        stmt = (pats.select().where((pats.c.issued_by == issuer_id) & (pats.c.user_id != issuer_id))
                .order_by(pats.c.created_at, pats.c.id))
        return [_pat(r) for r in await self._rows(stmt)]

    async def revoke_pat(self, pat_id: str, *, at: datetime | None = None) -> Pat | None:
        when = _aware(at) or utcnow()
        await self._write(pats.update().where((pats.c.id == pat_id) & pats.c.revoked_at.is_(None))
                          .values(revoked_at=when))
        return await self.get_pat(pat_id)

    async def find_auth(self, token_hash: str) -> AuthRecord | None:
        """The PAT with this keyed hash, its owner and the owner's domain roles (one round trip for the join)."""
        stmt = (sa.select(pats, users.c.name.label("u_name"), users.c.is_superadmin.label("u_super"),
                          users.c.created_at.label("u_created"), memberships.c.domain_id.label("m_domain"),
                          memberships.c.role.label("m_role"))
                .join(users, users.c.id == pats.c.user_id)
                .outerjoin(memberships, memberships.c.user_id == pats.c.user_id)
                .where(pats.c.token_hash == token_hash))
        rows = await self._rows(stmt)
        if not rows:
            return None
        first = rows[0]
        user = User(id=first.user_id, name=first.u_name, is_superadmin=bool(first.u_super),
                    created_at=_aware(first.u_created))
        roles = {r.m_domain: r.m_role for r in rows if r.m_domain is not None}
        return AuthRecord(pat=_pat(first), user=user, roles=roles)

    async def latest_recorded_time(self) -> datetime | None:
        """The latest time the service's clock put in the store (keys' last use and revocation), if any."""
        rows = await self._rows(sa.select(sa.func.max(pats.c.last_used_at), sa.func.max(pats.c.revoked_at)))
        times = [_aware(t) for t in rows[0] if t is not None]
        return max(times) if times else None

    async def record_last_used(self, seen: Mapping[str, datetime]) -> None:
        """Batch update of last_used_at (never moves it backwards); not a generation change."""
        if not seen:
            return
        async with self.engine.begin() as conn:
            for pat_id, when in seen.items():
                when = _aware(when)
                await conn.execute(pats.update().where(
                    (pats.c.id == pat_id) & ((pats.c.last_used_at.is_(None)) | (pats.c.last_used_at < when)))
                    .values(last_used_at=when))


async def open_store(settings: Any) -> Store:
    """Store for a Settings object (enclave.config.Settings)."""
    tls = None
    if getattr(settings, "database_tls", None) is not None:
        from enclave.database_tls import pinned_client_context

        tls = pinned_client_context(certificate_sha256_hex=settings.database_tls.server_certificate_sha256,
                                    spki_sha256_hex=settings.database_tls.server_spki_sha256)
    return await Store.open(settings.effective_database_url(), schema=settings.database_schema, tls=tls)


__all__ = ["AuthRecord", "Conflict", "Domain", "Member", "OWNER", "Owner", "Pat", "ROLES", "Store", "StoreError",
           "User", "canonical_uuid", "open_store", "utcnow"]
