"""Writes a machine depends on (/etc bookkeeping, the ESP's loader, kept indexes, recovery
keys, extension hashes): whole or not at all, and still there after a power cut."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make renames and new entries in `path` durable (a rename alone may not survive)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o644, tmp: Path | None = None) -> None:
    """A temporary beside `path` (default `.NAME.particle-tmp`) written in full, fsynced,
    renamed over `path`, then the directory fsynced: `path` is the old or the new content
    whatever interrupts it (on vfat as far as its rename allows). `mode` is given at creation
    (the umask may narrow it, never widen it: a secret made 0600 is never readable by others)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp or path.with_name(f".{path.name}.particle-tmp")
    # A temporary left by a run cut short goes first: reusing it would keep its old mode.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)  # over `path` (POSIX rename replaces)
    fsync_dir(path.parent)


def remove_tree(path: Path) -> None:
    """shutil.rmtree for python3-minimal: a directory and everything below it, or a file or
    symlink (never followed), if present."""
    if not os.path.lexists(path):
        return
    if path.is_symlink() or not path.is_dir():
        path.unlink()
        return
    for top, dirs, files in os.walk(path, topdown=False):
        for f in files:
            os.unlink(os.path.join(top, f))
        for d in dirs:
            p = os.path.join(top, d)
            os.unlink(p) if os.path.islink(p) else os.rmdir(p)
    os.rmdir(path)


def clear_dir(path: Path) -> None:
    """Everything below `path`, keeping `path` itself (a missing one is left missing)."""
    for p in path.iterdir() if path.is_dir() else []:
        remove_tree(p)
