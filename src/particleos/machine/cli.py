"""`particle` as installed in the image: argparse, one module per group of verbs. Each module
listed in VERB_MODULES exposes `register(subparsers)` and sets `func` on its parsers."""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that contribute verbs; a module that does not exist yet is skipped.
VERB_MODULES = ("status", "update", "ext", "overlay", "etc", "loader")


class MachineError(Exception):
    """A failure the user can act on: printed without a traceback, exit status 1."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="particle",
        description="Manage this ParticleOS machine: versions, updates, rollback, extensions.",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("-v", "--verbose", action="store_true", help="show commands run")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name in VERB_MODULES:
        try:
            module = importlib.import_module(f"particleos.machine.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"particleos.machine.{name}":
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except MachineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
