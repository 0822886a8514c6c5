"""Run apt and dkms inside a copy of the base tree: a private mount namespace (nothing leaks
to the host's mount table, everything is gone when the command ends), /dev, /proc and /sys
from the host, the shared apt caches bind-mounted in, and the host's resolver."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..cache import cache_root
from ..tools import run_in_root

ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "DEBIAN_FRONTEND": "noninteractive",
    "DEBCONF_NONINTERACTIVE_SEEN": "true",
    "LC_ALL": "C.UTF-8",
}


def apt_binds(release: str) -> list[tuple[Path, str]]:
    """Archives and package lists shared by every extension build of a release: a second
    build downloads nothing it already has (apt locks both, so builds may run side by side)."""
    archives = cache_root() / "apt-archives" / release
    lists = cache_root() / "apt-lists" / release
    for d in (archives / "partial", lists / "partial"):
        d.mkdir(parents=True, exist_ok=True)
    return [(archives, "/var/cache/apt/archives"), (lists, "/var/lib/apt/lists")]


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
