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


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
