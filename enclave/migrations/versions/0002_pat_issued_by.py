"""PATs record who issued them (an admin-issued key is visibly the admin's).

Revision ID: 0002_pat_issued_by
Revises: 0001_identity
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0002_pat_issued_by"
down_revision = "0001_identity"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # batch mode: SQLite cannot add a foreign key to an existing table in place.
    with op.batch_alter_table("pats") as batch:
        batch.add_column(sa.Column("issued_by", sa.String(36), nullable=True))
        batch.create_foreign_key("fk_pats_issued_by_users", "users", ["issued_by"], ["id"], ondelete="SET NULL")
    # Keys minted before this revision: their issuer is not known; the owner is the best record of it.
    op.execute("UPDATE pats SET issued_by = user_id WHERE issued_by IS NULL")


def downgrade() -> None:
    with op.batch_alter_table("pats") as batch:
        batch.drop_constraint("fk_pats_issued_by_users", type_="foreignkey")
        batch.drop_column("issued_by")
