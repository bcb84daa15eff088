"""Users, domains, memberships and PATs carry a MAC under a key sealed in the enclave (enclave.row_mac).

Revision ID: 0003_row_macs
Revises: 0002_pat_issued_by
Create Date: 2026-12-01

The column is nullable: rows written before this revision have no MAC and the store refuses them. Nothing here
computes MACs (a migration has no key, and must not vouch for rows the host may have written); a simulated
installation migrating its legacy plaintext secret adopts its rows once (Store.adopt_rows_without_mac).
"""

import sqlalchemy as sa
from alembic import op

revision = "0003_row_macs"
down_revision = "0002_pat_issued_by"
branch_labels = None
depends_on = None

TABLES = ("users", "domains", "memberships", "pats")


def upgrade() -> None:
    for table in TABLES:
        op.add_column(table, sa.Column("mac", sa.String(64), nullable=True))


def downgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.drop_column("mac")
