"""Run apt and dkms inside a copy of the base tree: a private mount namespace (nothing leaks
to the host's mount table, everything is gone when the command ends), /dev, /proc and /sys
from the host, the shared apt caches bind-mounted in, and the host's resolver."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..cache import shared_apt
from ..tools import run_in_root

ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "DEBIAN_FRONTEND": "noninteractive",
    "DEBCONF_NONINTERACTIVE_SEEN": "true",
    "LC_ALL": "C.UTF-8",
}


def run_apt(tree: Path, release: str, argv: Sequence[str], *, what: str) -> str:
    """apt in `tree` with the archives and lists every build of `release` shares (a second
    build downloads nothing it already has), waiting while another build uses them."""
    with shared_apt(release, lists=True) as binds:
        return run_in_tree(tree, argv, binds=binds, what=what)


def run_in_tree(
    tree: Path,
    argv: Sequence[str],
    *,
    binds: Sequence[tuple[Path, str]] = (),
    what: str,
    capture: bool = False,
) -> str:
    """Run `argv` chrooted into `tree` (host paths in `binds` appear at the given paths)."""
    return run_in_root(tree, argv, binds=binds, env=ENV, network=True, what=what,
                       capture=capture)
