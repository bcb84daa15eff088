"""Identity store: users, domains, memberships and PATs over SQLAlchemy 2 async (SQLite or PostgreSQL).

Migrations (enclave/migrations) run at open. ``generation`` increases on every write made through this Store so
an in-process cache of authentication results can tell it is stale (see enclave.auth).

Integrity: users, domains, memberships and PATs carry a MAC (``enclave.row_mac``) written with every insert and
update made here and checked on every read. A row whose MAC fails (edited, swapped, inserted by someone without
the key, or written before revision 0003) is never served: a read of one row returns None (for authentication:
an unknown key, 401), a list omits it; each refusal is logged at ERROR with the table and primary key and
reported to ``on_integrity_failure(table)`` (the Prometheus counter cube_store_integrity_failures_total).

Writes that take a right away (revocation, demotion, role change, removal, deletion) are checked to have taken
effect: the host's database could drop them silently (a rule or trigger), and then the store raises StoreError
rather than report success. A revoked key is refused by this process even if its revocation was dropped.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import ssl
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
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

from enclave.row_mac import RowMac
from enclave.schema import domains, memberships, pats, users

log = logging.getLogger("enclave.store")

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


def _user_fields(user: User) -> tuple[Any, ...]:
    return (user.id, user.name, user.is_superadmin)


def _domain_fields(domain: Domain) -> tuple[Any, ...]:
    return (domain.id, domain.name, domain.model_allowlist)


def _membership_fields(domain_id: str, user_id: str, role: str) -> tuple[Any, ...]:
    return (domain_id, user_id, role)


def _pat_fields(pat: Pat) -> tuple[Any, ...]:
    return (pat.id, pat.user_id, pat.domain_id, pat.token_hash, pat.scopes, pat.model_allowlist, pat.expires_at,
            pat.revoked_at, pat.issued_by)


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


IntegrityHook = Callable[[str], None]


class Store:
    def __init__(self, engine: AsyncEngine, *, row_key: bytes, on_integrity_failure: IntegrityHook | None = None
                 ) -> None:
        self.engine = engine
        self.generation = 0
        self._mac = RowMac(row_key)
        self.on_integrity_failure = on_integrity_failure
        # Keys this process saw revoked: an older copy of such a row put back (valid MAC, no revocation) is
        # refused for as long as the process runs. Per-row MACs alone cannot tell an old row from a current one.
        self._revoked: set[str] = set()

    @classmethod
    async def open(cls, url: str, *, row_key: bytes, schema: str | None = None, migrate: bool = True,
                   on_integrity_failure: IntegrityHook | None = None, tls: ssl.SSLContext | None = None) -> "Store":
        """``row_key``: the row-MAC key (``PlatformSecrets.row_mac_key()``). ``tls``: PostgreSQL over TLS with this
        context (enclave.database_tls pins the server)."""
        kwargs: dict[str, Any] = {}
        if tls is not None:
            if url.startswith("sqlite"):
                raise StoreError("TLS is for a PostgreSQL database")
            _require_tcp_host(url)
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
        store = cls(engine, row_key=row_key, on_integrity_failure=on_integrity_failure)
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

    async def _ensure_gone(self, table: sa.Table, where: Any, what: str) -> None:
        """After a delete that matched no row: StoreError when the row is still there. The database is the
        host's: a rule or trigger can swallow a delete, and a right must not survive its removal unnoticed."""
        if await self._rows(sa.select(sa.literal(1)).select_from(table).where(where)):
            raise StoreError(f"{what}: the database did not carry out the delete")

    @staticmethod
    def _ensure_kept(got: Any, wanted: Any, what: str) -> None:
        """After an update: StoreError unless the row now reads as written (see ``_ensure_gone``)."""
        if got != wanted:
            raise StoreError(f"{what}: the database did not keep the update")

    # integrity
    def _refused(self, table: str, key: str) -> None:
        log.error("store integrity: refused a %s row whose MAC does not match (primary key %s): edited, swapped "
                  "or inserted outside the enclave", table, key)
        if self.on_integrity_failure is not None:
            self.on_integrity_failure(table)

    def _checked(self, table: str, fields: tuple[Any, ...], mac: str | None) -> bool:
        if self._mac.valid(table, fields, mac):
            return True
        self._refused(table, "/".join(str(f) for f in fields[:2 if table == "memberships" else 1]))
        return False

    def _converted(self, table: str, convert: Callable[[Any], Any], row: Any) -> Any:
        """``convert(row)``, or None (refused) when the row holds values of a type the store never writes (e.g.
        JSON numbers where it writes a list of strings): a forgery like any other, not an error for the read."""
        try:
            return convert(row)
        except (TypeError, ValueError):
            self._refused(table, str(getattr(row, "id", "?")))
            return None

    def _user_row(self, row: Any) -> User | None:
        user = self._converted("users", _user, row)
        return user if user is not None and self._checked("users", _user_fields(user), row.mac) else None

    def _domain_row(self, row: Any) -> Domain | None:
        domain = self._converted("domains", _domain, row)
        return domain if domain is not None and self._checked("domains", _domain_fields(domain), row.mac) else None

    def _pat_row(self, row: Any) -> Pat | None:
        pat = self._converted("pats", _pat, row)
        if pat is None or not self._checked("pats", _pat_fields(pat), row.mac):
            return None
        if pat.revoked_at is None and pat.id in self._revoked:
            log.error("store integrity: refused a pats row from before its revocation (primary key %s): an older "
                      "copy was put back", pat.id)
            if self.on_integrity_failure is not None:
                self.on_integrity_failure("pats")
            return None
        if pat.revoked_at is not None:
            self._revoked.add(pat.id)
        return pat

    def _role_row(self, domain_id: str, user_id: str, role: str, mac: str | None) -> bool:
        return self._checked("memberships", _membership_fields(domain_id, user_id, role), mac)

    def _users(self, rows: Iterable[Any]) -> list[User]:
        return [u for u in map(self._user_row, rows) if u is not None]

    def _pats(self, rows: Iterable[Any]) -> list[Pat]:
        return [p for p in map(self._pat_row, rows) if p is not None]

    # users
    async def create_user(self, name: str, *, is_superadmin: bool = False) -> User:
        user = User(id=str(uuid.uuid4()), name=name, is_superadmin=is_superadmin, created_at=utcnow())
        await self._write(users.insert().values(id=user.id, name=name, is_superadmin=is_superadmin,
                                                created_at=user.created_at,
                                                mac=self._mac.mac("users", _user_fields(user))))
        return user

    async def get_user(self, user_id: str) -> User | None:
        rows = await self._rows(users.select().where(users.c.id == user_id))
        return self._user_row(rows[0]) if rows else None

    async def get_user_by_name(self, name: str) -> User | None:
        rows = await self._rows(users.select().where(users.c.name == name))
        return self._user_row(rows[0]) if rows else None

    async def list_users(self) -> list[User]:
        return self._users(await self._rows(users.select().order_by(users.c.name)))

    async def count_users(self) -> int:
        """Users whose rows pass their MAC (a row inserted by the host counts for nothing)."""
        return len(await self.list_users())

    async def count_rows(self) -> int:
        """All rows of the MAC'd tables, valid or not: whether this database was ever used."""
        total = 0
        for table in (users, domains, memberships, pats):
            total += int((await self._rows(sa.select(sa.func.count()).select_from(table)))[0][0])
        return total

    async def count_superadmins(self) -> int:
        rows = await self._rows(users.select().where(users.c.is_superadmin.is_(True)))
        return len(self._users(rows))

    async def update_user(self, user_id: str, *, name: str | None = None,
                          is_superadmin: bool | None = None) -> User | None:
        """None when there is no such user, or its row fails its MAC (then it is left as it is)."""
        current = await self.get_user(user_id)
        if current is None:
            return None
        changed = User(id=current.id, name=current.name if name is None else name,
                       is_superadmin=current.is_superadmin if is_superadmin is None else is_superadmin,
                       created_at=current.created_at)
        if changed == current:
            return current
        await self._write(users.update().where(users.c.id == user_id).values(
            name=changed.name, is_superadmin=changed.is_superadmin, mac=self._mac.mac("users", _user_fields(changed))))
        got = await self.get_user(user_id)
        self._ensure_kept(got, changed, f"user {user_id}")
        return got

    async def delete_user(self, user_id: str) -> bool:
        """Delete the user (their memberships and keys go with them). Keys they issued to others lose their
        issuer (issued_by becomes null, as the foreign key says) and are re-MAC'd here, in the same transaction:
        the database's own SET NULL would break their MACs."""
        try:
            async with self.engine.begin() as conn:
                issued = (await conn.execute(pats.select().where(
                    (pats.c.issued_by == user_id) & (pats.c.user_id != user_id)))).all()
                for pat in self._pats(issued):
                    orphan = dataclasses.replace(pat, issued_by=None)
                    await conn.execute(pats.update().where(pats.c.id == pat.id).values(
                        issued_by=None, mac=self._mac.mac("pats", _pat_fields(orphan))))
                deleted = (await conn.execute(users.delete().where(users.c.id == user_id))).rowcount > 0
        except IntegrityError as e:
            raise Conflict(str(e.orig).splitlines()[0] if e.orig else "conflict") from None
        self.generation += 1
        if not deleted:
            await self._ensure_gone(users, users.c.id == user_id, f"user {user_id}")
        return deleted

    # domains
    async def create_domain(self, name: str, *, model_allowlist: Iterable[str] | None = None) -> Domain:
        allow = list(model_allowlist) if model_allowlist is not None else None
        domain = Domain(id=str(uuid.uuid4()), name=name, model_allowlist=tuple(allow) if allow is not None else None,
                        created_at=utcnow())
        await self._write(domains.insert().values(id=domain.id, name=name, model_allowlist=allow,
                                                  created_at=domain.created_at,
                                                  mac=self._mac.mac("domains", _domain_fields(domain))))
        return domain

    async def get_domain(self, domain_id: str) -> Domain | None:
        rows = await self._rows(domains.select().where(domains.c.id == domain_id))
        return self._domain_row(rows[0]) if rows else None

    async def get_domain_by_name(self, name: str) -> Domain | None:
        rows = await self._rows(domains.select().where(domains.c.name == name))
        return self._domain_row(rows[0]) if rows else None

    async def list_domains(self, ids: Iterable[str] | None = None) -> list[Domain]:
        stmt = domains.select().order_by(domains.c.name)
        if ids is not None:
            stmt = stmt.where(domains.c.id.in_(list(ids)))
        return [d for d in map(self._domain_row, await self._rows(stmt)) if d is not None]

    async def update_domain(self, domain_id: str, *, name: str | None = None,
                            model_allowlist: Iterable[str] | None = None, clear_allowlist: bool = False
                            ) -> Domain | None:
        current = await self.get_domain(domain_id)
        if current is None:
            return None
        allow = current.model_allowlist
        if clear_allowlist:
            allow = None
        elif model_allowlist is not None:
            allow = tuple(model_allowlist)
        changed = Domain(id=current.id, name=current.name if name is None else name, model_allowlist=allow,
                         created_at=current.created_at)
        if changed == current:
            return current
        await self._write(domains.update().where(domains.c.id == domain_id).values(
            name=changed.name, model_allowlist=list(allow) if allow is not None else None,
            mac=self._mac.mac("domains", _domain_fields(changed))))
        got = await self.get_domain(domain_id)
        self._ensure_kept(got, changed, f"domain {domain_id}")
        return got

    async def delete_domain(self, domain_id: str) -> bool:
        where = domains.c.id == domain_id
        deleted = (await self._write(domains.delete().where(where))).rowcount > 0
        if not deleted:
            await self._ensure_gone(domains, where, f"domain {domain_id}")
        return deleted

    # memberships
    async def set_membership(self, domain_id: str, user_id: str, role: str) -> Member:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}")
        now = utcnow()
        mac = self._mac.mac("memberships", _membership_fields(domain_id, user_id, role))
        try:
            async with self.engine.begin() as conn:
                updated = await conn.execute(memberships.update().where(
                    (memberships.c.domain_id == domain_id) & (memberships.c.user_id == user_id))
                    .values(role=role, mac=mac))
                if updated.rowcount == 0:
                    await conn.execute(memberships.insert().values(domain_id=domain_id, user_id=user_id, role=role,
                                                                   created_at=now, mac=mac))
        except IntegrityError as e:
            raise Conflict(str(e.orig).splitlines()[0] if e.orig else "conflict") from None
        self.generation += 1
        member = await self.get_member(domain_id, user_id)
        if member is None:   # the user's row fails its MAC: the membership is stored, but never served
            raise StoreError(f"user {user_id}: its row failed the integrity check")
        self._ensure_kept(member.role, role, f"membership of user {user_id} in domain {domain_id}")
        return member

    async def get_member(self, domain_id: str, user_id: str) -> Member | None:
        members = await self.list_members(domain_id, user_id=user_id)
        return members[0] if members else None

    async def list_members(self, domain_id: str, *, user_id: str | None = None) -> list[Member]:
        stmt = (sa.select(memberships.c.role, memberships.c.created_at.label("joined_at"),
                          memberships.c.mac.label("m_mac"), users)
                .join(users, users.c.id == memberships.c.user_id)
                .where(memberships.c.domain_id == domain_id).order_by(users.c.name))
        if user_id is not None:
            stmt = stmt.where(memberships.c.user_id == user_id)
        members = []
        for r in await self._rows(stmt):
            if not self._role_row(domain_id, r.id, r.role, r.m_mac):
                continue
            user = self._user_row(r)
            if user is not None:
                members.append(Member(domain_id=domain_id, user=user, role=r.role, created_at=_aware(r.joined_at)))
        return members

    async def remove_membership(self, domain_id: str, user_id: str) -> bool:
        where = (memberships.c.domain_id == domain_id) & (memberships.c.user_id == user_id)
        removed = (await self._write(memberships.delete().where(where))).rowcount > 0
        if not removed:
            await self._ensure_gone(memberships, where, f"membership of user {user_id} in domain {domain_id}")
        return removed

    async def roles_of(self, user_id: str) -> dict[str, str]:
        rows = await self._rows(sa.select(memberships.c.domain_id, memberships.c.role, memberships.c.mac)
                                .where(memberships.c.user_id == user_id))
        return {r.domain_id: r.role for r in rows if self._role_row(r.domain_id, user_id, r.role, r.mac)}

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
            issued_by=pat.issued_by, mac=self._mac.mac("pats", _pat_fields(pat))))
        return pat

    async def get_pat(self, pat_id: str) -> Pat | None:
        rows = await self._rows(pats.select().where(pats.c.id == pat_id))
        return self._pat_row(rows[0]) if rows else None

    async def list_pats(self, *, user_id: str | None = None, domain_id: str | None = None) -> list[Pat]:
        stmt = pats.select().order_by(pats.c.created_at, pats.c.id)
        if user_id is not None:
            stmt = stmt.where(pats.c.user_id == user_id)
        if domain_id is not None:
            stmt = stmt.where(pats.c.domain_id == domain_id)
        return self._pats(await self._rows(stmt))

    async def list_issued_for_others(self, issuer_id: str) -> list[Pat]:
        """The keys ``issuer_id`` minted for other users (revoked ones included)."""
        stmt = (pats.select().where((pats.c.issued_by == issuer_id) & (pats.c.user_id != issuer_id))
                .order_by(pats.c.created_at, pats.c.id))
        return self._pats(await self._rows(stmt))

    async def revoke_pat(self, pat_id: str, *, at: datetime | None = None) -> Pat | None:
        """Revoke the key (once: a revoked key keeps its first revocation time). None when there is no such key
        or its row fails its MAC."""
        when = _aware(at) or utcnow()
        revoking = False
        async with self.engine.begin() as conn:
            rows = (await conn.execute(pats.select().where(pats.c.id == pat_id))).all()
            current = self._pat_row(rows[0]) if rows else None
            if current is None:
                return None
            if current.revoked_at is None:
                revoking = True
                self._revoked.add(pat_id)   # from now on refused by this process, whatever the database keeps
                revoked = dataclasses.replace(current, revoked_at=when)
                await conn.execute(pats.update().where((pats.c.id == pat_id) & pats.c.revoked_at.is_(None))
                                   .values(revoked_at=when, mac=self._mac.mac("pats", _pat_fields(revoked))))
        self.generation += 1
        got = await self.get_pat(pat_id)
        if revoking and got is None and await self._rows(sa.select(pats.c.id).where(pats.c.id == pat_id)):
            # the row is there but unrevoked (refused above) or unreadable: a swallowed update, not a success
            raise StoreError(f"key {pat_id}: the database did not keep its revocation (this process refuses it)")
        return got

    async def find_auth(self, token_hash: str) -> AuthRecord | None:
        """The PAT with this keyed hash, its owner and the owner's domain roles (one round trip for the join)."""
        """None also when the PAT's or its owner's row fails its MAC; a membership row that fails is left out."""
        stmt = (sa.select(pats, users.c.name.label("u_name"), users.c.is_superadmin.label("u_super"),
                          users.c.created_at.label("u_created"), users.c.mac.label("u_mac"),
                          memberships.c.domain_id.label("m_domain"), memberships.c.role.label("m_role"),
                          memberships.c.mac.label("m_mac"))
                .join(users, users.c.id == pats.c.user_id)
                .outerjoin(memberships, memberships.c.user_id == pats.c.user_id)
                .where(pats.c.token_hash == token_hash))
        rows = await self._rows(stmt)
        if not rows:
            return None
        first = rows[0]
        pat = self._pat_row(first)
        if pat is None:
            return None
        user = User(id=first.user_id, name=first.u_name, is_superadmin=bool(first.u_super),
                    created_at=_aware(first.u_created))
        if not self._checked("users", _user_fields(user), first.u_mac):
            return None
        roles = {r.m_domain: r.m_role for r in rows
                 if r.m_domain is not None and self._role_row(r.m_domain, user.id, r.m_role, r.m_mac)}
        return AuthRecord(pat=pat, user=user, roles=roles)

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


    async def adopt_rows_without_mac(self) -> int:
        """MAC the rows that carry none (written before revision 0003); how many were adopted.

        Only for the one-time migration of a simulated installation (enclave.sealed_state FROM_LEGACY): it
        vouches for whatever those rows say, so it must never run where the host could have written them.
        """
        adopted = 0
        async with self.engine.begin() as conn:
            for row in (await conn.execute(users.select().where(users.c.mac.is_(None)))).all():
                await conn.execute(users.update().where(users.c.id == row.id)
                                   .values(mac=self._mac.mac("users", _user_fields(_user(row)))))
                adopted += 1
            for row in (await conn.execute(domains.select().where(domains.c.mac.is_(None)))).all():
                await conn.execute(domains.update().where(domains.c.id == row.id)
                                   .values(mac=self._mac.mac("domains", _domain_fields(_domain(row)))))
                adopted += 1
            for row in (await conn.execute(memberships.select().where(memberships.c.mac.is_(None)))).all():
                mac = self._mac.mac("memberships", _membership_fields(row.domain_id, row.user_id, row.role))
                await conn.execute(memberships.update().where((memberships.c.domain_id == row.domain_id)
                                                              & (memberships.c.user_id == row.user_id)).values(mac=mac))
                adopted += 1
            for row in (await conn.execute(pats.select().where(pats.c.mac.is_(None)))).all():
                await conn.execute(pats.update().where(pats.c.id == row.id)
                                   .values(mac=self._mac.mac("pats", _pat_fields(_pat(row)))))
                adopted += 1
        self.generation += 1
        return adopted


def _require_tcp_host(url: str) -> None:
    """asyncpg uses no TLS on a Unix socket, and picks one itself (PGHOST, /run/postgresql, /tmp...) for a URL
    without a host: with a pinned TLS context such a URL would connect unpinned. It must name a TCP host."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    host = parsed.host or ""
    if not host or host.startswith("/") or "host" in parsed.query or "," in host:
        raise StoreError("database_tls: the database URL must name one TCP host (host:port), not a Unix socket or "
                         "a host list: asyncpg uses no TLS on a Unix socket")


async def database_in_use(url: str, *, schema: str | None = None, tls: ssl.SSLContext | None = None) -> bool:
    """Whether the database holds any user, domain, membership or PAT row (valid or not); migrates it."""
    import secrets

    store = await Store.open(url, row_key=secrets.token_bytes(32), schema=schema, tls=tls)
    try:
        return await store.count_rows() > 0
    finally:
        await store.close()


async def open_store(settings: Any, row_key: bytes, *, on_integrity_failure: IntegrityHook | None = None) -> Store:
    """Store for a Settings object (enclave.config.Settings) under the row-MAC key."""
    return await Store.open(settings.effective_database_url(), row_key=row_key, schema=settings.database_schema,
                            on_integrity_failure=on_integrity_failure, tls=database_tls_context(settings))


def database_tls_context(settings: Any) -> ssl.SSLContext | None:
    """The pinned TLS context of ``settings.database_tls`` (enclave.database_tls), None when not configured."""
    if getattr(settings, "database_tls", None) is None:
        return None
    from enclave.database_tls import pinned_client_context

    return pinned_client_context(certificate_sha256_hex=settings.database_tls.server_certificate_sha256,
                                 spki_sha256_hex=settings.database_tls.server_spki_sha256)


__all__ = ["AuthRecord", "Conflict", "Domain", "Member", "OWNER", "Owner", "Pat", "ROLES", "Store", "StoreError",
           "User", "canonical_uuid", "open_store", "utcnow"]
