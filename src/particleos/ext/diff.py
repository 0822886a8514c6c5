"""What packages changed under /usr: the tree after installing them against the base tree it
was copied from. Only what is added or changed goes into an extension, so it shares every
library the base already has and stays small; changes to base files are reported, because an
extension that replaces a base file silently changes the base for every program."""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

# Never shipped: systemd-sysext refuses an extension with its own os-release, and the factory
# copies of /etc and /var belong to the base.
NEVER = ("lib/os-release", "share/factory/")


@dataclass
class UsrDiff:
    """Paths relative to /usr (POSIX form, no leading slash)."""

    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    def kept(self) -> list[str]:
        return sorted(p for p in [*self.added, *self.changed] if not _never(p))


def _never(rel: str) -> bool:
    return any(rel == n or rel.startswith(n) for n in NEVER)


def same_entry(a: os.stat_result, b: os.stat_result, pa: Path, pb: Path) -> bool:
    """True when two non-directory entries are the same file for an extension's purposes:
    same type, permissions and owner, and the same link target or content. Equal size and
    modification time count as equal content (both trees come from `cp -a`, and dpkg stamps
    files with the package's times), as rsync assumes; anything else is compared byte-wise."""
    if stat.S_IFMT(a.st_mode) != stat.S_IFMT(b.st_mode):
        return False
    if (a.st_mode, a.st_uid, a.st_gid) != (b.st_mode, b.st_uid, b.st_gid):
        return False
    if stat.S_ISLNK(a.st_mode):
        return os.readlink(pa) == os.readlink(pb)
    if not stat.S_ISREG(a.st_mode):
        return (a.st_rdev, a.st_size) == (b.st_rdev, b.st_size)
    if a.st_size != b.st_size:
        return False
    if a.st_mtime_ns == b.st_mtime_ns:
        return True
    return _same_content(pa, pb)


def _same_content(pa: Path, pb: Path) -> bool:
    with pa.open("rb") as fa, pb.open("rb") as fb:
        while True:
            ca, cb = fa.read(1 << 20), fb.read(1 << 20)
            if ca != cb:
                return False
            if not ca:
                return True


def diff_usr(base: Path, new: Path) -> UsrDiff:
    """Compare two /usr trees. Directories count as added only when they are new (a changed
    directory mode is not worth shipping); everything else is compared with same_entry()."""
    result = UsrDiff()
    for rel, st in _walk(new):
        pb = base / rel
        try:
            bst = os.lstat(pb)
        except FileNotFoundError:
            result.added.append(rel)
            continue
        if stat.S_ISDIR(st.st_mode) and stat.S_ISDIR(bst.st_mode):
            continue
        if not same_entry(bst, st, pb, new / rel):
            result.changed.append(rel)
    for rel, _ in _walk(base):
        if not os.path.lexists(new / rel):
            result.removed.append(rel)
    for lst in (result.added, result.changed, result.removed):
        lst.sort()
    return result


def _walk(root: Path) -> Iterable[tuple[str, os.stat_result]]:
    """(relative path, lstat) of every entry below `root`, parents before children; symlinks
    to directories are entries, never followed."""
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        with os.scandir(root / rel_dir if rel_dir else root) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            st = entry.stat(follow_symlinks=False)
            yield rel, st
            if stat.S_ISDIR(st.st_mode):
                stack.append(rel)


def copy_selection(src: Path, dest: Path, paths: Iterable[str]) -> int:
    """Copy `paths` (relative to `src`) into `dest` with their parents, keeping modes, owners,
    times and extended attributes (file capabilities). Returns the bytes of file data copied."""
    total = 0
    for rel in sorted(set(paths)):
        s, d = src / rel, dest / rel
        _make_parents(src, dest, rel)
        st = os.lstat(s)
        if stat.S_ISDIR(st.st_mode):
            d.mkdir(exist_ok=True)
            shutil.copystat(s, d, follow_symlinks=False)
            os.lchown(d, st.st_uid, st.st_gid)
            continue
        if os.path.lexists(d):
            d.unlink()
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(s), d)
        else:
            shutil.copy2(s, d, follow_symlinks=False)
            total += st.st_size
        os.lchown(d, st.st_uid, st.st_gid)
    # Directory times last: creating entries in them changed their mtime again.
    for rel in sorted(set(paths), reverse=True):
        if (src / rel).is_dir() and not (src / rel).is_symlink():
            shutil.copystat(src / rel, dest / rel, follow_symlinks=False)
    return total


def _make_parents(src: Path, dest: Path, rel: str) -> None:
    parts = rel.split("/")[:-1]
    for i in range(1, len(parts) + 1):
        sub = "/".join(parts[:i])
        d = dest / sub
        if d.is_dir():
            continue
        st = os.lstat(src / sub)
        d.mkdir()
        os.chmod(d, stat.S_IMODE(st.st_mode))
        os.lchown(d, st.st_uid, st.st_gid)
