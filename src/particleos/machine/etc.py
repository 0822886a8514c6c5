"""`particle etc diff [PATH]` and `particle etc revert PATH`: what the owner changed in /etc
against the running version's factory /etc, and putting a factory file back."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from pathlib import Path

from . import etcmerge
from .cli import MachineError

ETC = Path("/etc")
FACTORY = Path("/usr/share/factory/etc")


def relative(path: str) -> str:
    """/etc/foo, etc/foo and foo all name /etc/foo."""
    p = os.path.normpath(path)
    for prefix in ("/etc/", "etc/"):
        if p.startswith(prefix):
            p = p[len(prefix):]
    if p in ("/etc", "etc", ".", "/"):
        return ""
    if p.startswith("/") or p == ".." or p.startswith("../"):
        raise MachineError(f"{path} is not under /etc")
    return p


def unified(factory: Path, ours: Path) -> str:
    """`diff -u` of two text files (diffutils is essential in Debian); "" for binary files."""
    proc = subprocess.run(["diff", "-u", "--label", f"factory/{ours.relative_to(ETC)}",
                           "--label", str(ours), str(factory), str(ours)],
                          capture_output=True, text=True, errors="replace", check=False)
    if proc.returncode == 1 and not proc.stdout.startswith("Binary files"):
        return proc.stdout
    return ""


def cmd_diff(args: argparse.Namespace) -> int:
    under = relative(args.path) if args.path else ""
    found = etcmerge.changes(ETC, FACTORY, under)
    if args.json or args.etc_json:
        print(json.dumps([{"path": f"/etc/{c.path}", "change": c.change, "detail": c.detail}
                          for c in found], indent=2))
        return 0
    if not found:
        print("no changes against the factory /etc" + (f" under /etc/{under}" if under else ""))
        return 0
    for c in found:
        print(f"{c.change:<8} /etc/{c.path}" + (f"  {c.detail}" if c.detail else ""))
    for c in found:
        if c.change == "changed" and (FACTORY / c.path).is_file() and \
                not (FACTORY / c.path).is_symlink() and (ETC / c.path).is_file():
            text = unified(FACTORY / c.path, ETC / c.path)
            if text:
                print()
                print(text, end="")
    return 0


def cmd_revert(args: argparse.Namespace) -> int:
    rel = relative(args.path)
    if not rel:
        raise MachineError("name a file under /etc to revert")
    try:
        print(etcmerge.revert(ETC, FACTORY, rel))
    except (etcmerge.EtcError, OSError) as err:
        raise MachineError(str(err)) from err
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("etc", help="this machine's /etc against the factory /etc")
    verbs = p.add_subparsers(dest="etc_verb", metavar="VERB")
    d = verbs.add_parser("diff", help="what was changed here against the factory /etc")
    d.add_argument("path", nargs="?", help="a file or directory under /etc")
    d.add_argument("--json", dest="etc_json", action="store_true", help="machine-readable")
    d.set_defaults(func=cmd_diff)
    r = verbs.add_parser("revert", help="put the factory version of a file back")
    r.add_argument("path", help="a file under /etc")
    r.set_defaults(func=cmd_revert)
