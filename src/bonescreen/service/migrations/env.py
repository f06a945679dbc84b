"""Alembic environment for the service database.

Run through :mod:`bonescreen.service.migrate` (``bonescreen db upgrade``, or
``serve`` at start), which passes an open connection in
``config.attributes["connection"]``; there is no alembic.ini to keep in sync.
"""

from __future__ import annotations

from alembic import context

from bonescreen.service.store import Base

target_metadata = Base.metadata
connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - only reached by a bare `alembic` command
    raise RuntimeError("run migrations with `bonescreen db upgrade` (bonescreen.service.migrate)")
context.configure(connection=connection, target_metadata=target_metadata,
                  render_as_batch=connection.dialect.name == "sqlite", compare_type=True)
with context.begin_transaction():
    context.run_migrations()
