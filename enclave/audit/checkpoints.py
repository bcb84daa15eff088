"""Signed checkpoints over the chain: the enclave's attested key vouches that entry ``seq`` has hash ``hash``.

A checkpoint is signed only over an entry this enclave can tell is genuine (its MAC holds and its content
hashes to the stored hash; the head is checked by ``AuditChain.verified_head`` first): the hash commits to
every entry before it, so the verifier needs nothing else from the database. The signing key's public key and
evidence are stored once per key (``audit_signing_keys``), each checkpoint names its key by id.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from attestation.audit import CHECKPOINT_PURPOSE, checkpoint_statement
from attestation.signing import canonical_json
from enclave.audit.chain import AuditChain, rfc3339
from enclave.schema import audit_checkpoints, audit_signing_keys
from enclave.signer import SignerSource

@dataclass(frozen=True)
class Checkpoint:
    statement: dict[str, Any]
    signature: bytes


class Checkpointer:
    def __init__(self, chain: AuditChain, signer: SignerSource) -> None:
        self.chain = chain
        self.signer = signer
        self.last_signed: int = 0   # the highest seq this process checkpointed

    async def _store_key(self) -> str:
        # The first get() may make the key and its evidence (a device call): off the event loop.
        identity = (await asyncio.to_thread(self.signer.get)).identity
        async with self.chain.engine.connect() as conn:
            found = (await conn.execute(sa.select(audit_signing_keys.c.key_id)
                                        .where(audit_signing_keys.c.key_id == identity.key_id))).first()
        if found is None:
            try:
                async with self.chain.engine.begin() as conn:
                    await conn.execute(audit_signing_keys.insert().values(
                        key_id=identity.key_id, public_key=identity.public_key_der, evidence=identity.evidence_cbor,
                        created_at=self.chain.clock()))
            except IntegrityError:
                pass   # stored meanwhile (the row's content is the verifier's to judge, as for every row)
        return identity.key_id

    async def sign(self, seq: int, digest: str) -> Checkpoint:
        """Sign and store a checkpoint over (seq, digest), which the caller verified."""
        signer_key_id = await self._store_key()
        now = self.chain.clock()
        statement = checkpoint_statement(seq=seq, hash=digest, time=rfc3339(now), signer_key_id=signer_key_id)
        signature = self.signer.get().sign(CHECKPOINT_PURPOSE, canonical_json(statement))
        async with self.chain.engine.begin() as conn:
            await conn.execute(audit_checkpoints.insert().values(
                seq=seq, key_id=signer_key_id, statement=canonical_json(statement).decode("utf-8"),
                signature=signature, created_at=now))
        self.last_signed = max(self.last_signed, seq)
        return Checkpoint(statement, signature)

    async def latest_stored_seq(self) -> int:
        async with self.chain.engine.connect() as conn:
            value = (await conn.execute(sa.select(sa.func.max(audit_checkpoints.c.seq)))).scalar()
        return int(value or 0)

    async def checkpoint_head(self, *, force: bool = False) -> Checkpoint | None:
        """Sign the verified head if it moved past the latest checkpoint (any replica's); ``force``: even if not."""
        seq, digest = await self.chain.verified_head()
        if seq == 0:
            return None
        if not force and seq <= max(self.last_signed, await self.latest_stored_seq()):
            return None
        return await self.sign(seq, digest)

    async def checkpoint_at(self, seq: int) -> Checkpoint | None:
        """Sign entry ``seq`` if it is genuine (an export's end before the head); None when it is not."""
        stored = await self.chain.entry(seq)
        if stored is None or not stored.genuine:
            await self.chain.report_tamper(f"entry {seq} cannot be checkpointed: " + (
                "it is missing" if stored is None else "it was not written by an enclave (MAC or hash fails)"))
            return None
        return await self.sign(stored.seq, stored.hash)
