"""The ``bonescreen`` command: a thin argparse layer over plain functions.

Each verb lives in ``bonescreen.commands.<verb>`` and exposes
``register(subparsers)``; modules there import heavy libraries (torch, ...)
only inside their handlers so that ``bonescreen --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from bonescreen import __version__
from bonescreen.errors import BonescreenError

# Order here is the order in ``bonescreen --help``.
COMMANDS = [
    "demo",
    "phantom",
    "cohort",
    "public_pool",
    "preprocess",
    "train",
    "pseudolabel",
    "distill",
    "evaluate",
    "screen",
    "calibrate",
    "adapt",
    "profiles",
    "explain",
    "export",
    "ood",
    "serve",
    "users",
    "db",
    "monitor",
    "pediatric",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bonescreen",
        description="Opportunistic bone-health screening from chest radiographs.",
    )
    parser.add_argument("--version", action="version", version=f"bonescreen {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"bonescreen.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"bonescreen.commands.{name}":
                continue  # verb not built yet
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except BonescreenError as exc:
        print(f"bonescreen {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
