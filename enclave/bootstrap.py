"""First-start bootstrap: the first superadmin, a default domain and a superadmin PAT (shown once)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

from enclave.access import ALL_SCOPES
from enclave.auth import Clock
from enclave.config import Settings
from enclave.store import Conflict, Domain, Store, User, utcnow
from enclave.tokens import generate_token, token_hash

log = logging.getLogger("enclave.bootstrap")


@dataclass(frozen=True)
class Bootstrap:
    user: User
    domain: Domain
    token: str
    expires_days: int


async def bootstrap_if_empty(store: Store, settings: Settings, server_secret: bytes,
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
    await store.create_pat(user_id=user.id, name="bootstrap", token_hash=token_hash(server_secret, token),
                           last4=token[-4:], scopes=ALL_SCOPES, expires_at=clock() + timedelta(days=days))
    log.info("bootstrapped superadmin %s and domain %s", user.id, domain.id)
    return Bootstrap(user=user, domain=domain, token=token, expires_days=days)
