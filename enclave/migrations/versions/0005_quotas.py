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


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
