"""``bonescreen db upgrade|current``: the service database's schema revision (Alembic)."""

from __future__ import annotations

import argparse

from bonescreen.commands.serve import add_settings_args, load_settings


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("db", help="the service database's schema: upgrade it, or show its revision",
                       description="Schema migrations of the service database (shipped inside the package). "
                                   "Back up the database before `upgrade`. Same --config / --data-dir / "
                                   "--db-url as `bonescreen serve`.")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    for name, help in (("upgrade", "migrate the database to this version's schema"),
                       ("current", "print the database's revision and the newest one")):
        q = verbs.add_parser(name, help=help)
        add_settings_args(q)
        q.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    from bonescreen.service import migrate
    from bonescreen.service.store import Store

    cfg = load_settings(args)
    cfg.data_path.mkdir(parents=True, exist_ok=True)
    store = Store(cfg.database_url)
    try:
        if args.verb == "current":
            cur = migrate.current(store)
            print(f"database {cfg.database_url_masked}: revision {cur or 'none (empty, or made before migrations)'}"
                  f"; newest {migrate.head()}")
            return 0
        before, after = migrate.upgrade(store)
        if before != after:
            store.audit("db_upgrade", actor="cli", detail={"from": before, "to": after})
        print(f"database {cfg.database_url_masked}: {before or 'empty'} -> {after}")
        return 0
    finally:
        store.dispose()
