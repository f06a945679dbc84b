"""``bonescreen users add|list|disable|enable|role|passwd|token|revoke``: the service's accounts.

Passwords are read from a prompt (twice) or, when standard input is not a
terminal, from its first line; never from the command line, where ``ps``
and the shell history would show them. Every change is audited.
"""

from __future__ import annotations

import argparse
import getpass
import sys

from bonescreen.commands.serve import add_settings_args, open_store
from bonescreen.errors import BonescreenError

ROLES = ("viewer", "reviewer", "admin")


class UsersError(BonescreenError):
    reason = "users"


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("users", help="accounts of the screening service (roles viewer, reviewer, admin)",
                       description="Manage the service's accounts and their API tokens. Use the same "
                                   "--config / --data-dir / --db-url as `bonescreen serve`.")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    def verb(name: str, help: str) -> argparse.ArgumentParser:
        q = verbs.add_parser(name, help=help)
        add_settings_args(q)
        q.set_defaults(func=handler)
        return q

    q = verb("add", "create an account (password from a prompt or standard input)")
    q.add_argument("username")
    q.add_argument("--role", choices=ROLES, required=True)
    q.add_argument("--sso-only", action="store_true",
                   help="no password: the account signs in by single sign-on only")
    q.add_argument("--oidc-subject", metavar="SUB", help="bind to this OIDC subject (default: matched by name)")
    verb("list", "list accounts (name, role, state, tokens)")
    verb("disable", "disable an account (its sessions end and its API tokens are revoked)").add_argument("username")
    verb("enable", "enable a disabled account").add_argument("username")
    q = verb("role", "change an account's role")
    q.add_argument("username")
    q.add_argument("role", choices=ROLES)
    verb("passwd", "set an account's password (prompt or standard input)").add_argument("username")
    q = verb("token", "create an API token for an account (printed once; only its hash is stored)")
    q.add_argument("username")
    q.add_argument("--name", default="", help="a label, e.g. 'pacs-integration'")
    q = verb("revoke", "revoke one of an account's API tokens")
    q.add_argument("username")
    q.add_argument("token_id", type=int)


def read_password(confirm: bool = True) -> str:
    if not sys.stdin.isatty():
        line = sys.stdin.readline()
        if not line:
            raise UsersError("no password on standard input")
        return line.rstrip("\r\n")
    first = getpass.getpass("Password: ")
    if confirm and getpass.getpass("Again: ") != first:
        raise UsersError("the two passwords differ")
    return first


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"[:64]
    except Exception:
        return "cli"


def handler(args: argparse.Namespace) -> int:
    from bonescreen.service.auth import AuthError, hash_password, new_token, token_digest
    from bonescreen.service.store import StoreError

    _cfg, store = open_store(args)
    actor = _actor()
    try:
        if args.verb == "list":
            users = store.users()
            if not users:
                print("no accounts")
            for u in users:
                toks = [t for t in store.tokens(u.id) if not t.revoked]
                print(f"{u.username}\t{u.role}\t{'disabled' if u.disabled else 'enabled'}\t"
                      f"{'password' if u.password_hash else 'sso-only'}\t{len(toks)} token(s)")
            return 0
        name = args.username
        if args.verb == "add":
            pw_hash = None if args.sso_only else hash_password(read_password())
            store.add_user(name, args.role, pw_hash, oidc_subject=args.oidc_subject)
            store.audit("user_add", actor=actor, target=name, detail={"role": args.role, "sso_only": args.sso_only})
            print(f"account {name} created ({args.role})")
            return 0
        user = store.get_user(username=name)
        if user is None:
            raise UsersError(f"no account {name!r} (bonescreen users list)")
        if args.verb in ("disable", "enable"):
            store.update_user(name, disabled=args.verb == "disable")
            store.audit("user_disable" if args.verb == "disable" else "user_update", actor=actor, target=name,
                        detail={"disabled": args.verb == "disable"})
            print(f"account {name} {args.verb}d")
        elif args.verb == "role":
            store.update_user(name, role=args.role)
            store.audit("user_update", actor=actor, target=name, detail={"role": args.role})
            print(f"account {name} is now {args.role}")
        elif args.verb == "passwd":
            store.update_user(name, password_hash=hash_password(read_password()))
            store.audit("user_update", actor=actor, target=name, detail={"password": "changed"})
            print(f"password of {name} changed")
        elif args.verb == "token":
            if user.disabled:
                raise UsersError(f"account {name} is disabled")
            token = new_token()
            tid = store.add_token(user.id, token_digest(token), args.name)
            store.audit("token_create", actor=actor, target=name, detail={"token_id": tid, "name": args.name})
            print(f"API token {tid} for {name} (shown once; store it in a file readable only by its user):",
                  file=sys.stderr)
            print(token)
        elif args.verb == "revoke":
            if not store.revoke_token(user.id, args.token_id):
                raise UsersError(f"{name} has no token {args.token_id}")
            store.audit("token_revoke", actor=actor, target=name, detail={"token_id": args.token_id})
            print(f"token {args.token_id} of {name} revoked")
        return 0
    except (AuthError, StoreError) as exc:
        raise UsersError(str(exc)) from None
    finally:
        store.dispose()


