"""Run apt and dkms inside a copy of the base tree: a private mount namespace (nothing leaks
to the host's mount table, everything is gone when the command ends), /dev, /proc and /sys
from the host, the shared apt caches bind-mounted in, and the host's resolver."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .. import runner
from ..cache import cache_root

_ENTER = r"""
set -e
tree="$1"; shift
n="$1"; shift
i=0
while [ "$i" -lt "$n" ]; do
    mkdir -p "$1" "$tree$2"
    mount --bind "$1" "$tree$2"
    shift 2
    i=$((i + 1))
done
mount --bind /dev "$tree/dev"
mount -t proc proc "$tree/proc"
mount -t sysfs sysfs "$tree/sys"
mount -t tmpfs tmpfs "$tree/tmp"
rm -f "$tree/etc/resolv.conf"
cp -L /etc/resolv.conf "$tree/etc/resolv.conf" 2>/dev/null || true
exec chroot "$tree" "$@"
"""

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
    flat: list[str] = []
    for src, dst in binds:
        flat += [str(src), dst]
    env = [f"{k}={v}" for k, v in ENV.items()]
    proc = runner.run(
        ["unshare", "--mount", "--propagation", "private", "--",
         "sh", "-c", _ENTER, "particle-ext", os.fspath(tree), str(len(binds)), *flat,
         "env", "-i", *env, *argv],
        what=what, capture=capture,
    )
    return proc.stdout.decode(errors="replace") if capture else ""
