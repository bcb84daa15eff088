"""Limits, budgets and their shared counters (enclave.quotas).

Revision ID: 0005_quotas
Revises: 0004_usage_ledger
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0005_quotas"
down_revision = "0004_usage_ledger"
branch_labels = None
depends_on = None

LIMIT_COLUMNS = ("rpm", "tpm", "concurrent", "tokens_per_day", "tokens_per_month")


def upgrade() -> None:
    op.create_table(
        "quota_limits",
        sa.Column("subject_kind", sa.String(8), nullable=False),
        sa.Column("domain_id", sa.String(36), nullable=False),
        sa.Column("subject_id", sa.String(36), nullable=False),
        *[sa.Column(kind, sa.BigInteger, nullable=True) for kind in LIMIT_COLUMNS],
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("mac", sa.String(64), nullable=True),
        sa.PrimaryKeyConstraint("subject_kind", "domain_id", "subject_id", name="pk_quota_limits"),
    )
    op.create_table(
        "quota_counters",
        sa.Column("subject", sa.String(80), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("window_start", sa.BigInteger, nullable=False),
        sa.Column("replica", sa.String(36), nullable=False),
        sa.Column("held", sa.BigInteger, nullable=False),
        sa.Column("in_use", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("subject", "kind", "window_start", "replica", name="pk_quota_counters"),
    )
    op.create_table(
        "quota_replicas",
        sa.Column("replica", sa.String(36), nullable=False),
        sa.Column("beat_at", sa.Float, nullable=False),
        sa.PrimaryKeyConstraint("replica", name="pk_quota_replicas"),
    )


def downgrade() -> None:
    for table in ("quota_replicas", "quota_counters", "quota_limits"):
        op.drop_table(table)
