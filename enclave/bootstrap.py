"""First-start bootstrap: the first superadmin, a default domain and a superadmin PAT, and how that PAT reaches
the operator; and the recovery key issued the same way when no superadmin holds a usable platform key.

A new key never outlives the key that mints it (``access.bound_new_pat``), so every key descends from, and
ends no later than, a key issued here. When the last usable one has expired or been revoked, the next start
issues a fresh superadmin key to the operator by the same safe delivery: the chain is renewed from outside
itself, by whoever can open what the enclave seals (never by whoever can read its console).

Outside simulation the console, container logs and (possibly) the data disk are the host's, so the PAT is
never printed there: it is sealed to the operator's X25519 key (``bootstrap.operator_public_key``) or written
to ``--pat-file`` (0600, for a file system only the VM reads); with neither the enclave refuses to bootstrap.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from enclave.access import ALL_SCOPES, Scope
from enclave.auth import Clock
from enclave.config import Settings
from enclave.sealing import load_public_key, public_key_text, seal
from enclave.store import Conflict, Domain, Pat, Store, User, utcnow
from enclave.tokens import generate_token, token_hash

log = logging.getLogger("enclave.bootstrap")

SEALED_PAT_FILE_NAME = "bootstrap-pat.sealed"
OPEN_COMMAND = "cube-admin bootstrap open --key <operator private key file>"


class BootstrapRefused(Exception):
    """The store is empty and no safe way to hand over the bootstrap PAT is configured."""


@dataclass(frozen=True)
class IssuedKey:
    """A superadmin key issued here (bootstrap or recovery), still to be handed over (``deliver_or_revoke``)."""
    token: str
    pat_id: str


@dataclass(frozen=True)
class Bootstrap(IssuedKey):
    user: User
    domain: Domain
    expires_days: int


@dataclass(frozen=True)
class PatDelivery:
    """Where the bootstrap PAT goes: ``sealed`` (to the operator key, into ``path``), ``file`` (``path``, 0600)
    or ``print`` (simulation only)."""
    kind: str
    path: Path | None = None


@dataclass(frozen=True)
class Delivered:
    """What the banner says about the delivered PAT, and how its examples refer to it (never the PAT itself
    unless the delivery was ``print``)."""
    lines: list[str]
    shell_key: str
    python_key: str


def choose_delivery(settings: Settings, pat_file: Path | None) -> PatDelivery | None:
    """The operator key of the configuration file (the measured image) wins: ``--pat-file`` is a launch
    argument, set by whoever starts the process, so with an operator key it only says where the *sealed* PAT
    goes; a plain PAT file is for deployments without one."""
    if settings.bootstrap.operator_public_key:
        return PatDelivery("sealed", pat_file or settings.data_dir / SEALED_PAT_FILE_NAME)
    if pat_file is not None:
        return PatDelivery("file", pat_file)
    if settings.simulate:
        return PatDelivery("print")
    return None


REFUSAL = ("refusing to bootstrap the first superadmin: outside --simulate its API key is never printed (the "
           "console and logs belong to the host). Set bootstrap.operator_public_key in the configuration file "
           "(make a key pair with `cube-admin bootstrap keygen --out operator.key`) to get the key "
           "sealed to you, or pass --pat-file FILE on a file system only the VM can read.")


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` where only this user reads it: never through a symbolic link, never into a file that is
    not a regular one owned by this user, and 0600 before the first byte lands (a looser file left there
    would otherwise have held the PAT, readable, until a chmod after the write)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError as e:
        raise BootstrapRefused(f"refusing to write the PAT to {path}: {e.strerror} (a symbolic link?)") from None
    with os.fdopen(fd, "w") as fh:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            raise BootstrapRefused(f"refusing to write the PAT to {path}: not a regular file owned by this user")
        os.fchmod(fd, 0o600)
        os.ftruncate(fd, 0)
        fh.write(text)


def deliver(delivery: PatDelivery, settings: Settings, token: str, *, what: str = "Bootstrap") -> Delivered:
    """Hand the PAT over as ``delivery`` says; the returned lines hold it only for ``print``. ``what`` names
    the key in them (``Bootstrap`` or ``Recovery``)."""
    if delivery.kind == "print":
        if not settings.simulate:
            raise BootstrapRefused(REFUSAL)
        return Delivered([f"{what} superadmin API key (simulation only; shown once, store it now):",
                          f"  {token}"], shell_key=token, python_key=repr(token))
    assert delivery.path is not None
    if delivery.kind == "file":
        _write_private(delivery.path, token + "\n")
        return Delivered([f"{what} superadmin API key written to {delivery.path} (mode 0600)."],
                         shell_key=f"$(cat {delivery.path})", python_key=f"open({str(delivery.path)!r}).read().strip()")
    key = load_public_key(settings.bootstrap.operator_public_key or "")
    blob = seal(token.encode(), key)
    _write_private(delivery.path, blob + "\n")
    return Delivered([f"{what} superadmin API key, sealed to the operator key {public_key_text(key)}",
                      f"(also in {delivery.path}); only that key's holder can open it:", f"  {blob}",
                      f"Open it on the operator's machine:  {OPEN_COMMAND} < sealed-file"],
                     shell_key="$CUBE_TOKEN", python_key="os.environ['CUBE_TOKEN']")


async def deliver_or_revoke(store: Store, key: IssuedKey, delivery: PatDelivery, settings: Settings, *,
                            what: str = "Bootstrap") -> Delivered:
    """``deliver`` the key; if the hand-over fails, revoke it: a key nobody received would otherwise count as
    usable and hold off the recovery key until it expired, locking the operator out."""
    try:
        return deliver(delivery, settings, key.token, what=what)
    except BaseException:
        await store.revoke_pat(key.pat_id)
        raise


async def bootstrap_if_empty(store: Store, settings: Settings, pat_key: bytes,
                             clock: Clock = utcnow) -> Bootstrap | None:
    """Create the first superadmin (+ default domain, + PAT) when the store has no users; else None.

    Two replicas starting together: the unique user name makes the loser's insert fail, and it returns None.
    """
    if await store.count_users() > 0:
        return None
    try:
        user = await store.create_user(settings.bootstrap.admin_name, is_superadmin=True)
    except Conflict:
        return None
    domain = next((d for d in await store.list_domains() if d.name == settings.bootstrap.domain_name), None)
    if domain is None:
        domain = await store.create_domain(settings.bootstrap.domain_name)
    await store.set_membership(domain.id, user.id, "admin")
    token = generate_token()
    days = settings.pat_default_ttl_days
    pat = await store.create_pat(user_id=user.id, name="bootstrap", token_hash=token_hash(pat_key, token),
                                 last4=token[-4:], scopes=ALL_SCOPES, expires_at=clock() + timedelta(days=days))
    log.info("bootstrapped superadmin %s and domain %s", user.id, domain.id)
    return Bootstrap(token=token, pat_id=pat.id, user=user, domain=domain, expires_days=days)


def _is_platform_key(pat: Pat, now: datetime) -> bool:
    return (pat.domain_id is None and pat.revoked_at is None and now < pat.expires_at
            and Scope.MANAGE.value in pat.scopes)


async def recover_if_locked_out(store: Store, settings: Settings, pat_key: bytes,
                                clock: Clock = utcnow) -> IssuedKey | None:
    """A fresh platform key for the first superadmin when no superadmin holds a usable one
    (unbound, with ``manage``, neither expired nor revoked); else None. Call it only with a safe delivery."""
    superadmins = [u for u in await store.list_users() if u.is_superadmin]
    if not superadmins:
        return None
    now = clock()
    for user in superadmins:
        if any(_is_platform_key(p, now) for p in await store.list_pats(user_id=user.id)):
            return None
    user = min(superadmins, key=lambda u: u.created_at)
    token = generate_token()
    days = settings.pat_default_ttl_days
    pat = await store.create_pat(user_id=user.id, name="recovery", token_hash=token_hash(pat_key, token),
                                 last4=token[-4:], scopes=ALL_SCOPES, expires_at=now + timedelta(days=days))
    log.warning("no superadmin held a usable platform key: issued a recovery key for superadmin %s", user.id)
    return IssuedKey(token=token, pat_id=pat.id)
