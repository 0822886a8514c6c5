"""Where caches live, and the atomic-write helpers every stage uses: a result appears whole
under its final name or not at all, so an interrupted build never leaves half a cache entry."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
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
    """Yield a temporary sibling directory; rename it onto `final` only if the block succeeds.

    The temporary (and the replaced old tree) are owned through a held lock file, so that a
    later build can sweep them when this process was killed outright (`sweep_stale`).
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    tmp = final.with_name(f".{final.name}.tmp-{token}")
    with owner_lock(final.with_name(f".{final.name}.{token}.lock")):
        try:
            yield tmp
            fsync_path(tmp)
            if final.exists():
                old = final.with_name(f".{final.name}.old-{token}")
                os.rename(final, old)
                os.rename(tmp, final)
                remove_tree(old)
            else:
                os.rename(tmp, final)
            fsync_path(final.parent)
        finally:
            remove_tree(tmp)


@contextlib.contextmanager
def cache_entry(final: Path, ready: Callable[[Path], bool]) -> Iterator[Path | None]:
    """One maker per cache entry: yields None when `final` is ready (at once, or after
    waiting for another process that was making it), else a temporary directory that becomes
    `final` when the block succeeds (`atomic_dir`). Without the wait, two builds that miss the
    same entry both make it, and the second replaces it while the first copies from it."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if ready(final):
        yield None
        return
    lock = final.with_name(f".{final.name}.making")
    fd = _lock_existing(lock)
    try:
        if ready(final):
            yield None
            return
        with atomic_dir(final) as tmp:
            yield tmp
    finally:
        # Unlinked while still held: a waiter on this inode then sees it gone and retries.
        lock.unlink(missing_ok=True)
        os.close(fd)


def _lock_existing(lock: Path) -> int:
    """flock `lock`, creating it if need be, and return the descriptor once the lock is held
    on the file that still has that name (its holder unlinks it before letting go)."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


@contextlib.contextmanager
def shared_apt(release: str, *, lists: bool = False) -> Iterator[list[tuple[Path, str]]]:
    """The apt archives (and, with `lists`, package lists) every build of `release` shares,
    as (host path, path in the tree) binds, held for the block. apt's own lock on them fails
    at once when another apt holds it ("Could not get lock"), so two builds installing at
    the same time would fail: this flock makes the second one wait its turn."""
    shared = [(apt_archives(release), "/var/cache/apt/archives")]
    if lists:
        shared.append((cache_root() / "apt-lists" / release, "/var/lib/apt/lists"))
    (shared[-1][0] / "partial").mkdir(parents=True, exist_ok=True)
    fd = os.open(shared[0][0].with_name(f"{release}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            from .ui import ui

            ui.info(f"waiting for another build that uses the shared apt cache of {release}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield shared
    finally:
        os.close(fd)


def apt_archives(release: str) -> Path:
    """Where the .deb files of `release` are kept between builds (see shared_apt)."""
    archives = cache_root() / "apt-archives" / release
    (archives / "partial").mkdir(parents=True, exist_ok=True)
    return archives


@contextlib.contextmanager
def owner_lock(lock: Path) -> Iterator[None]:
    """Hold an exclusive flock on a new file `lock` for the block: while this process lives,
    what the lock names is in use. The file appears already locked (created under another
    name, locked, then renamed), so a sweeper never sees it unowned."""
    new = lock.with_name(f"{lock.name}.new")
    fd = os.open(new, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.rename(new, lock)
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)
    finally:
        new.unlink(missing_ok=True)
        os.close(fd)


@contextlib.contextmanager
def work_dir(path: Path) -> Iterator[Path]:
    """A build's private directory, owned by this process (`PATH.lock` is held) and removed
    when the block ends, however it ends."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with owner_lock(path.with_name(f"{path.name}.lock")):
        path.mkdir()
        try:
            yield path
        finally:
            remove_tree(path)


_OWNED = re.compile(r"^\.(?P<name>.+)\.(tmp|old)-(?P<token>[0-9a-f]{8})$")


def sweep_stale(root: Path | None = None) -> list[Path]:
    """Remove work directories and atomic_dir temporaries whose owner is gone (a build killed
    outright, e.g. SIGKILL or power loss). Entries without a lock file are left alone: they
    may belong to a running build of an older version. Returns what was removed."""
    root = root or cache_root()
    candidates: list[tuple[Path, Path]] = []
    work = root / "work"
    if work.is_dir():
        candidates += [(d, d.with_name(f"{d.name}.lock")) for d in sorted(work.iterdir())
                       if d.is_dir() and not d.is_symlink()]
    for parent in [root, *sorted(p for p in root.iterdir() if p.is_dir())] if root.is_dir() else []:
        for entry in sorted(parent.iterdir()):
            m = _OWNED.match(entry.name)
            if m:
                candidates.append((entry, parent / f".{m['name']}.{m['token']}.lock"))
    removed = []
    for target, lock in candidates:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its owner is alive
            try:
                remove_tree(target)
            except OSError:
                continue  # e.g. mounts that cannot be detached; the lock stays for next time
            lock.unlink(missing_ok=True)
            removed.append(target)
        finally:
            os.close(fd)
    return removed


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
