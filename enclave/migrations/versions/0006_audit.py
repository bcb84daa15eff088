"""The audit trail and its signed checkpoints (enclave.audit).

Revision ID: 0006_audit
Revises: 0005_quotas
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0006_audit"
down_revision = "0005_quotas"
branch_labels = None
depends_on = None


GENESIS = "00" * 32   # attestation.audit.GENESIS: the head of an empty chain


def upgrade() -> None:
    head = op.create_table(
        "audit_head",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    op.bulk_insert(head, [{"id": 1, "seq": 0, "hash": GENESIS}])
    op.create_table(
        "audit_entries",
        sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("entry", sa.Text, nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("mac", sa.String(64), nullable=True),
    )
    op.create_index("ix_audit_entries_time", "audit_entries", ["time"])
    op.create_table(
        "audit_signing_keys",
        sa.Column("key_id", sa.String(64), primary_key=True),
        sa.Column("public_key", sa.LargeBinary, nullable=False),
        sa.Column("evidence", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "audit_checkpoints",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("statement", sa.Text, nullable=False),
        sa.Column("signature", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_audit_checkpoints_seq", "audit_checkpoints", ["seq"])


def downgrade() -> None:
    for table in ("audit_checkpoints", "audit_signing_keys", "audit_entries", "audit_head"):
        op.drop_table(table)
