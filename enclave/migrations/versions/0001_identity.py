"""Identity: users, domains, memberships, personal access tokens.

Revision ID: 0001_identity
Revises:
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

revision = "0001_identity"
down_revision = None
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("is_superadmin", sa.Boolean, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_users"),
        sa.UniqueConstraint("name", name="uq_users_name"),
    )
    op.create_table(
        "domains",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("model_allowlist", sa.JSON, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_domains"),
        sa.UniqueConstraint("name", name="uq_domains_name"),
    )
    op.create_table(
        "memberships",
        sa.Column("domain_id", sa.String(36), nullable=False),
        sa.Column("user_id", sa.String(36), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("domain_id", "user_id", name="pk_memberships"),
        sa.CheckConstraint("role IN ('admin', 'member')", name="ck_memberships_role"),
        sa.ForeignKeyConstraint(["domain_id"], ["domains.id"], name="fk_memberships_domain_id_domains",
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name="fk_memberships_user_id_users", ondelete="CASCADE"),
    )
    op.create_table(
        "pats",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("user_id", sa.String(36), nullable=False),
        sa.Column("domain_id", sa.String(36), nullable=True),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("last4", sa.String(4), nullable=False),
        sa.Column("scopes", sa.JSON, nullable=False),
        sa.Column("model_allowlist", sa.JSON, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("expires_at", TS, nullable=False),
        sa.Column("revoked_at", TS, nullable=True),
        sa.Column("last_used_at", TS, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_pats"),
        sa.UniqueConstraint("token_hash", name="uq_pats_token_hash"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name="fk_pats_user_id_users", ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["domain_id"], ["domains.id"], name="fk_pats_domain_id_domains",
                                ondelete="CASCADE"),
    )
    op.create_index("ix_pats_user_id", "pats", ["user_id"])


def downgrade() -> None:
    op.drop_index("ix_pats_user_id", table_name="pats")
    op.drop_table("pats")
    op.drop_table("memberships")
    op.drop_table("domains")
    op.drop_table("users")
