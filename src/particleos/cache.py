"""Where caches live, and the atomic-write helpers every stage uses: a result appears whole
under its final name or not at all, so an interrupted build never leaves half a cache entry."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path


def cache_root() -> Path:
    """$PARTICLE_CACHE_DIR, else $XDG_CACHE_HOME/particleos, else ~/.cache/particleos."""
    env = os.environ.get("PARTICLE_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "particleos"


def remove_tree(path: Path) -> None:
    """rm -rf that never reaches through a mount: a tree left behind by an interrupted
    mmdebstrap or chroot may still have /dev or /proc bind-mounted inside it, and deleting
    through those would delete the host's device nodes. Such mounts are detached first."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        for mount in reversed(mounts_below(path)):
            subprocess.run(["umount", "--lazy", mount], check=False, capture_output=True)
        if mounts_below(path):
            raise OSError(f"{path} still has mounts inside it; not removing it")
        shutil.rmtree(path)


def mounts_below(path: Path) -> list[str]:
    """Mount points at or below `path`, outermost first (from /proc/self/mountinfo)."""
    prefix = os.path.realpath(path)
    found = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        point = line.split()[4].replace("\\040", " ")
        if point == prefix or point.startswith(prefix + "/"):
            found.append(point)
    return sorted(found, key=len)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; rename it onto `final` only if the block succeeds."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        fsync_path(tmp)
        if final.exists():
            old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(final, old)
            os.rename(tmp, final)
            remove_tree(old)
        else:
            os.rename(tmp, final)
        fsync_path(final.parent)
    finally:
        remove_tree(tmp)


@contextlib.contextmanager
def atomic_file(final: Path, mode: str = "wb") -> Iterator[Path]:
    """Yield a temporary path next to `final`; fsync and rename it into place on success."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, final)
        fsync_path(final.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_atomic(final: Path, data: bytes | str) -> None:
    with atomic_file(final) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def fsync_path(path: Path) -> None:
    """fsync a file, or a directory's entries (not recursive: callers sync what they renamed)."""
    if not path.exists():
        return
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
