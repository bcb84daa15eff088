"""The usage ledger (enclave.usage): one MAC'd row per inference request, never its content.

Revision ID: 0004_usage_ledger
Revises: 0003_row_macs
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0004_usage_ledger"
down_revision = "0003_row_macs"
branch_labels = None
depends_on = None


INDEXES = {
    "ix_usage_records_created_at": ["created_at"],
    "ix_usage_records_domain_id_created_at": ["domain_id", "created_at"],
    "ix_usage_records_user_id_created_at": ["user_id", "created_at"],
    "ix_usage_records_pat_id_created_at": ["pat_id", "created_at"],
}


def upgrade() -> None:
    timestamp = sa.DateTime(timezone=True)
    op.create_table(
        "usage_records",
        sa.Column("request_id", sa.String(64), nullable=False),
        sa.Column("created_at", timestamp, nullable=False),
        sa.Column("domain_id", sa.String(36), nullable=False),
        sa.Column("user_id", sa.String(36), nullable=False),
        sa.Column("pat_id", sa.String(36), nullable=False),
        sa.Column("model", sa.String(512), nullable=False),
        sa.Column("backend", sa.String(100), nullable=False),
        sa.Column("route", sa.String(64), nullable=False),
        sa.Column("stream", sa.Boolean, nullable=False),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger, nullable=False),
        sa.Column("completion_tokens", sa.BigInteger, nullable=False),
        sa.Column("total_tokens", sa.BigInteger, nullable=False),
        sa.Column("estimated", sa.Boolean, nullable=False),
        sa.Column("ttft_ms", sa.Integer, nullable=True),
        sa.Column("duration_ms", sa.Integer, nullable=False),
        sa.Column("request_sha256", sa.String(80), nullable=True),
        sa.Column("response_sha256", sa.String(80), nullable=True),
        sa.Column("mac", sa.String(64), nullable=True),
        sa.PrimaryKeyConstraint("request_id", name="pk_usage_records"),
    )
    for name, columns in INDEXES.items():
        op.create_index(name, "usage_records", columns)


def downgrade() -> None:
    for name in INDEXES:
        op.drop_index(name, table_name="usage_records")
    op.drop_table("usage_records")
