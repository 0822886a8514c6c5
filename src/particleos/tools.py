"""Build tools that the host may lack or have in too old a version (ukify, erofs-utils 1.8,
sbsign ...) run from a cached Debian trixie "tools tree", entered with chroot in a private
mount namespace, as mkosi's ToolsTree does. Host paths that a tool reads or writes are bind
mounted at the same place inside the tree, so callers pass ordinary host paths."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from . import runner
from .cache import atomic_dir, cache_root
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

_ENTER = r"""
set -e
tree="$1"; shift
nbinds="$1"; shift
i=0
while [ "$i" -lt "$nbinds" ]; do
    src="$1"; shift
    mkdir -p "$tree$src"
    mount --bind "$src" "$tree$src"
    i=$((i + 1))
done
mount --bind /dev "$tree/dev"
mount -t proc proc "$tree/proc"
exec chroot "$tree" "$@"
"""


class ToolsTree:
    """A cached trixie root with the build tools; created on first use (about a minute)."""

    def __init__(self, mirror: str = "http://deb.debian.org/debian") -> None:
        self.mirror = mirror
        key = hashlib.sha256(
            "\n".join([TOOLS_RELEASE, mirror, TOOLS_LAYOUT_VERSION, *TOOLS_PACKAGES]).encode()
        ).hexdigest()[:16]
        self.path = cache_root() / "tools" / f"{TOOLS_RELEASE}-{key}"

    def ensure(self) -> Path:
        if (self.path / "usr/bin/ukify").exists():
            ui.debug(f"tools tree: {self.path} (cache hit)")
            return self.path
        with ui.step("Preparing the tools tree (once)"), atomic_dir(self.path) as tmp:
            runner.run(
                [
                    "mmdebstrap", "--variant=apt", "--mode=root",
                    "--include=" + ",".join(TOOLS_PACKAGES),
                    "--dpkgopt=path-exclude=/usr/share/man/*",
                    "--dpkgopt=path-exclude=/usr/share/doc/*",
                    "--dpkgopt=path-exclude=/usr/share/locale/*",
                    TOOLS_RELEASE, str(tmp), self.mirror,
                ],
                what="mmdebstrap of the tools tree",
            )
        return self.path

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
        dirs = sorted({str(Path(b).resolve()) for b in binds})
        envargs = [f"{k}={v}" for k, v in (env or {}).items()]
        proc = runner.run(
            [
                "unshare", "--mount", "--propagation", "private", "--",
                "sh", "-c", _ENTER, "particle-tools", str(tree), str(len(dirs)), *dirs,
                "env", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", *envargs,
                *[os.fspath(a) for a in argv],
            ],
            what=what or Path(os.fspath(argv[0])).name,
            capture=capture,
        )
        return proc.stdout.decode() if capture else ""

