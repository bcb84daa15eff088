"""Alembic environment: run programmatically by enclave.store with a live connection in config.attributes.

For authoring a new revision by hand: ``alembic -c enclave/migrations/alembic.ini revision -m "..."``
with ``sqlalchemy.url`` given via ``-x url=sqlite:///scratch.db``.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from enclave.schema import metadata

config = context.config


def _run(connection) -> None:
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True,
                      compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
elif context.is_offline_mode():
    context.configure(url=context.get_x_argument(as_dictionary=True).get("url"), target_metadata=metadata,
                      literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    url = context.get_x_argument(as_dictionary=True).get("url") or "sqlite:///alembic-scratch.db"
    with create_engine(url).connect() as conn:
        _run(conn)
