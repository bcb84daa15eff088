"""The usage ledger (enclave.usage).

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


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
