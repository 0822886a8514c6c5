"""Build tools that the host may lack or have in too old a version (ukify, erofs-utils 1.8,
sbsign ...) run from a cached Debian trixie "tools tree", entered with chroot in a private
mount namespace, as mkosi's ToolsTree does. Host paths that a tool reads or writes are bind
mounted at the same place inside the tree, so callers pass ordinary host paths."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from . import runner
from .cache import cache_entry, cache_root
from .ui import ui

TOOLS_RELEASE = "trixie"
TOOLS_PACKAGES = (
    "erofs-utils",
    "squashfs-tools",
    "systemd-ukify",
    "python3-pefile",
    "binutils",
    "sbsigntool",
    "python3-virt-firmware",
)
TOOLS_LAYOUT_VERSION = "1"

# Enter a root with chroot inside a private mount namespace: the mounts vanish with the
# command, whatever happens. Kernel file systems first, then the binds (so a bind below /tmp is
# not hidden by the tmpfs); with $net = 1 the host's resolver is copied in for apt.
_ENTER = r"""
set -e
tree="$1"; shift
net="$1"; shift
n="$1"; shift
mount --bind /dev "$tree/dev"
mount -t proc proc "$tree/proc"
mount -t sysfs sysfs "$tree/sys"
mount -t tmpfs tmpfs "$tree/tmp"
i=0
while [ "$i" -lt "$n" ]; do
    mkdir -p "$1" "$tree$2"
    mount --bind "$1" "$tree$2"
    shift 2
    i=$((i + 1))
done
if [ "$net" = 1 ]; then
    rm -f "$tree/etc/resolv.conf"
    cp -L /etc/resolv.conf "$tree/etc/resolv.conf" 2>/dev/null || true
fi
exec chroot "$tree" "$@"
"""
BASE_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8"}


def run_in_root(
    tree: Path,
    argv: Sequence[str | os.PathLike[str]],
    *,
    binds: Iterable[tuple[Path, str]] = (),
    env: Mapping[str, str] | None = None,
    network: bool = False,
    what: str,
    capture: bool = False,
) -> str:
    """Run `argv` chrooted into `tree` with a clean environment (BASE_ENV + `env`); each host
    path of `binds` appears at the given path inside. Used for the tools tree and for apt/dkms
    in extension trees."""
    pairs = [(str(src), dst) for src, dst in binds]
    envargs = [f"{k}={v}" for k, v in {**BASE_ENV, **(env or {})}.items()]
    proc = runner.run(
        ["unshare", "--mount", "--propagation", "private", "--",
         "sh", "-c", _ENTER, "particle-chroot", str(tree), "1" if network else "0",
         str(len(pairs)), *[x for pair in pairs for x in pair],
         "env", "-i", *envargs, *[os.fspath(a) for a in argv]],
        what=what, capture=capture,
    )
    return proc.stdout.decode(errors="replace") if capture else ""


class ToolsTree:
    """A cached trixie root with the build tools; created on first use (about a minute).
    `packages`, `where` and `marker` (a file whose presence means the tree is complete) let
    other trees, such as the mkosi benchmark's, reuse the same code path."""

    def __init__(
        self,
        mirror: str = "http://deb.debian.org/debian",
        *,
        packages: Sequence[str] = TOOLS_PACKAGES,
        where: Path | None = None,
        marker: str = "usr/bin/ukify",
    ) -> None:
        self.mirror = mirror
        self.packages = tuple(packages)
        self.marker = marker
        key = hashlib.sha256(
            "\n".join([TOOLS_RELEASE, mirror, TOOLS_LAYOUT_VERSION, *self.packages]).encode()
        ).hexdigest()[:16]
        self.path = (where or cache_root() / "tools") / f"{TOOLS_RELEASE}-{key}"

    def ensure(self) -> Path:
        with cache_entry(self.path, lambda p: (p / self.marker).exists()) as tmp:
            if tmp is None:
                ui.debug(f"tools tree: {self.path} (cache hit)")
                return self.path
            self._make(tmp)
        return self.path

    def _make(self, tmp: Path) -> None:
        with ui.step("Preparing the tools tree (once)"):
            runner.run(
                [
                    "mmdebstrap", "--variant=apt", "--mode=root",
                    "--include=" + ",".join(self.packages),
                    "--dpkgopt=path-exclude=/usr/share/man/*",
                    "--dpkgopt=path-exclude=/usr/share/doc/*",
                    "--dpkgopt=path-exclude=/usr/share/locale/*",
                    TOOLS_RELEASE, str(tmp), self.mirror,
                ],
                what="mmdebstrap of the tools tree",
            )

    def run(
        self,
        argv: Sequence[str | os.PathLike[str]],
        *,
        binds: Iterable[Path],
        what: str | None = None,
        env: dict[str, str] | None = None,
        capture: bool = False,
    ) -> str:
        """Run a tool inside the tree; `binds` are host directories the tool needs to see."""
        tree = self.ensure()
        dirs = sorted({Path(b).resolve() for b in binds})
        return run_in_root(
            tree, argv, binds=[(d, str(d)) for d in dirs], env=env,
            what=what or Path(os.fspath(argv[0])).name, capture=capture,
        )

