"""Schema migrations (Alembic; the revisions ship inside the package, ``service/migrations``).

``serve`` calls :func:`ensure_schema` at start: it upgrades the database to
the newest revision (``db_auto_upgrade``, the default) or refuses to start
and names the command to run. ``bonescreen db upgrade|current`` does the
same by hand.

A database made before migrations existed (``create_all``; tables, no
``alembic_version``) is stamped at revision 0001, the schema that code made,
and upgraded from there, so its rows are kept. Several processes starting at
once on one database take a lock first (PostgreSQL: an advisory lock;
SQLite: a lock file next to the database), so one upgrades and the others
find the schema current.
"""

from __future__ import annotations

import fcntl
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import Engine, inspect, text

from bonescreen.errors import BonescreenError

__all__ = ["MigrationError", "current", "ensure_schema", "head", "upgrade"]

log = logging.getLogger(__name__)
logging.getLogger("alembic").setLevel(logging.WARNING)  # the one line per upgrade below is enough

MIGRATIONS = Path(__file__).with_name("migrations")
BASELINE = "0001"
_PG_LOCK_KEY = 0x626F6E65  # "bone"


class Store(Protocol):
    """What migrating needs of ``service.store.Store`` (structural, so that the store can
    call ``upgrade`` without the two modules importing each other)."""

    engine: Engine
    dialect: str

    def audit(self, action: str, actor: str | None = None, target: str | None = None, detail: Any = None,
              ip: str | None = None) -> None: ...


class MigrationError(BonescreenError):
    reason = "schema_out_of_date"


def _config(connection: Any) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def head() -> str:
    from alembic.script import ScriptDirectory

    return str(ScriptDirectory.from_config(_config(None)).get_current_head())


def _current(connection: Any) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(connection).get_current_revision()


def _unversioned_legacy(connection: Any) -> bool:
    names = set(inspect(connection).get_table_names())
    return "jobs" in names and "alembic_version" not in names


def current(store: Store) -> str | None:
    """The revision the database is at; ``"0001 (unstamped)"``-like legacy schemas report the baseline."""
    with store.engine.connect() as conn:
        if _unversioned_legacy(conn):
            return None
        return _current(conn)


@contextmanager
def _migration_lock(store: Store) -> Iterator[Any]:
    if store.dialect == "postgresql":
        with store.engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _PG_LOCK_KEY})
            conn.commit()
            try:
                yield conn
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_LOCK_KEY})
                conn.commit()
        return
    db = store.engine.url.database
    lock_path = Path(f"{db}.migrate.lock") if db else None
    fh = open(lock_path, "a+") if lock_path else None
    try:
        if fh is not None:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        with store.engine.connect() as conn:
            yield conn
    finally:
        if fh is not None:
            fh.close()


def upgrade(store: Store, revision: str = "head") -> tuple[str | None, str]:
    """Upgrade to ``revision``; returns (revision before, revision after)."""
    from alembic import command

    with _migration_lock(store) as conn:
        before = _current(conn)
        if before is None and _unversioned_legacy(conn):
            log.info("database made before migrations: stamping revision %s", BASELINE)
            command.stamp(_config(conn), BASELINE)
            conn.commit()
            before = BASELINE
        command.upgrade(_config(conn), revision)
        conn.commit()
        after = _current(conn)
    if before != after:
        log.info("database schema upgraded from %s to %s", before or "empty", after)
    return before, str(after)


def ensure_schema(store: Store, *, auto_upgrade: bool, command_hint: str = "bonescreen db upgrade",
                  actor: str = "serve") -> str:
    """At start: the schema is current, or is made current, or the service refuses to run."""
    want = head()
    have = current(store)
    if have == want:
        return want
    if not auto_upgrade:
        raise MigrationError(
            f"the database schema is at revision {have or 'none (or pre-migration)'}, this version needs {want}; "
            f"back up the database, then run: {command_hint}  (or set db_auto_upgrade: true)"
        )
    before, after = upgrade(store)
    if before != after:
        store.audit("db_upgrade", actor=actor, detail={"from": before, "to": after})
    return after
