"""The three-way merge of /etc at the first boot of every new version, and the rollback of /etc.

Each /etc carries a stamp (`/etc/.particle-factory`, the os-release of the version it was
derived from). The factory /etc of each version the machine ran is kept under
`/var/lib/particle/etc/factory/VERSION`: that is the *base* of the next merge. At the first
boot of version R (stamp O != R), in the initrd before anything reads /etc:

* when `/var/lib/particle/etc/saved/R` exists (the /etc R had when the machine left it: a
  rollback, or the fallback after a failed trial), it comes back as it was;
* otherwise base = factory copy of O, theirs = R's `/usr/share/factory/etc`, ours = /etc,
  merged path by path into a new tree (`/.etc.particle-new`).

Either tree is swapped with /etc in one rename (RENAME_EXCHANGE); the /etc it replaces is
kept as `saved/O`. A tree counts only once its stamp is written, and the stamp is written last:
whatever a power cut interrupts, the next boot finds /etc whole (old or new), finishes what
is finished and discards what is not (`settle`).

Standard library only (trixie's python3-minimal: no shutil, tempfile or ctypes); in the
initrd it runs as `chroot /sysroot python3 -m particleos.machine.etcmerge boot /`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .files import fsync_dir, remove_tree, write_atomic

STAMP = ".particle-factory"  # in /etc: os-release of the version this /etc derives from
CONFLICTS = ".particle-conflicts.json"  # in /etc: conflicts of the merges, for status
PRIVATE = frozenset({STAMP, CONFLICTS})  # top-level names that never take part in a merge
SAVED_SUFFIX = ".particle-new"  # the new factory file, beside a locally changed one
NEW_TREE = ".etc.particle-new"  # under the root: the tree being built, swapped with /etc
STATE = "var/lib/particle/etc"  # under the root
FACTORY = "usr/share/factory/etc"


class EtcError(Exception):
    """A merge that cannot be done: /etc is left as it is."""


# --- what a path is -----------------------------------------------------------------------

@dataclass(frozen=True)
class Node:
    """What the merge compares: type, permissions, owner, and content or link target."""

    kind: str  # "file", "dir", "link", "other"
    mode: int
    uid: int
    gid: int
    data: str  # sha256 of a file, target of a link, "" for a dir, rdev for others

    @property
    def is_dir(self) -> bool:
        return self.kind == "dir"


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def node(path: Path) -> Node | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISDIR(st.st_mode):
        return Node("dir", mode, st.st_uid, st.st_gid, "")
    if stat.S_ISLNK(st.st_mode):
        return Node("link", 0, st.st_uid, st.st_gid, os.readlink(path))
    if stat.S_ISREG(st.st_mode):
        return Node("file", mode, st.st_uid, st.st_gid, digest(path))
    return Node("other", stat.S_IFMT(st.st_mode) | mode, st.st_uid, st.st_gid, str(st.st_rdev))


def scan(root: Path | None) -> dict[str, Node]:
    """Every path under root (relative, "/"-separated), without following links; the
    top-level stamp and conflict list are left out."""
    found: dict[str, Node] = {}
    if root is None or not root.is_dir():
        return found
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        for name in sorted(dirnames + filenames):
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if rel in PRIVATE:
                continue
            n = node(Path(dirpath, name))
            if n is not None:
                found[rel] = n
    return found


def subtree(tree: dict[str, Node], rel: str) -> tuple[tuple[str, Node], ...]:
    """A path and everything under it, for comparing whole subtrees."""
    n = tree.get(rel)
    if n is None or not n.is_dir:
        return () if n is None else ((rel, n),)
    prefix = rel + "/"
    return tuple((p, n) for p, n in sorted(tree.items()) if p == rel or p.startswith(prefix))


# --- the merge ------------------------------------------------------------------------------

@dataclass
class Plan:
    """Where each path of the merged tree comes from, and the conflicts."""

    take: dict[str, str]  # rel -> "ours" | "theirs"
    save_theirs: list[str]  # rels whose new factory version is saved beside as REL.particle-new
    conflicts: list[dict[str, str | None]]


def plan(base: dict[str, Node], theirs: dict[str, Node], ours: dict[str, Node]) -> Plan:
    """Decide every path, parents before children. Unchanged here -> the new factory's;
    unchanged in the factory -> ours; changed alike on both sides -> ours; changed
    differently on both -> ours, the factory's saved beside it, listed as a conflict. A
    directory on both sides (or one the new version dropped) merges path by path; where one
    side is not a directory the whole subtree is compared as one."""
    p = Plan({}, [], [])
    index: dict[str, set[str]] = {}
    for tree in (base, theirs, ours):
        for path in tree:
            index.setdefault(os.path.dirname(path), set()).add(path)

    def children(rel: str) -> list[str]:
        return sorted(index.get(rel, ()))

    def decide(rel: str) -> None:
        b, t, o = base.get(rel), theirs.get(rel), ours.get(rel)
        if o is not None and t is not None and o.is_dir and t.is_dir:
            if b is not None and b.is_dir:  # metadata: three-way as well, ours on a clash
                p.take[rel] = "theirs" if (o.mode, o.uid, o.gid) == (b.mode, b.uid, b.gid) \
                    else "ours"
            else:
                p.take[rel] = "ours"
            for child in children(rel):
                decide(child)
            return
        if o is not None and o.is_dir and b is not None and b.is_dir and t is None:
            # The new version dropped this directory: what is unchanged in it goes, what
            # the owner added or changed stays (and keeps the directory).
            p.take[rel] = "ours"
            kept = len(p.take)
            for child in children(rel):
                decide(child)
            if len(p.take) == kept:
                del p.take[rel]
            return
        sb, st, so = subtree(base, rel), subtree(theirs, rel), subtree(ours, rel)
        if so == sb:
            chosen = "theirs" if t is not None else None
        elif st in (sb, so):
            chosen = "ours" if o is not None else None
        else:
            chosen = "ours" if o is not None else None
            if t is not None:
                p.save_theirs.append(rel)
            reason = ("changed here and in the new version" if o is not None and t is not None
                      else "changed here, removed in the new version" if o is not None
                      else "removed here, changed in the new version")
            p.conflicts.append({
                "path": rel,
                "saved": rel + SAVED_SUFFIX if t is not None else None,
                "reason": reason,
                "digest": o.data if o is not None and o.kind == "file" else None,
            })
        if chosen is None:
            return
        tree = ours if chosen == "ours" else theirs
        for path, _ in subtree(tree, rel):
            p.take[path] = chosen

    for top in children(""):
        decide(top)
    return p


# --- copying with everything kept -------------------------------------------------------------

def _copy_xattrs(src: Path, dst: Path) -> None:
    try:
        names = os.listxattr(src, follow_symlinks=False)
    except OSError:
        return
    for name in names:
        with contextlib.suppress(OSError):
            os.setxattr(dst, name, os.getxattr(src, name, follow_symlinks=False),
                        follow_symlinks=False)


def copy_node(src: Path, dst: Path) -> None:
    """One path (not what is under a directory) with its type, mode, owner, times, xattrs;
    file contents fsynced."""
    st = os.lstat(src)
    if stat.S_ISDIR(st.st_mode):
        dst.mkdir(mode=0o700)
    elif stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src), dst)
    elif stat.S_ISREG(st.st_mode):
        with open(src, "rb") as fi, open(dst, "xb") as fo:
            while chunk := fi.read(1 << 20):
                fo.write(chunk)
            fo.flush()
            os.fsync(fo.fileno())
    else:
        os.mknod(dst, st.st_mode, st.st_rdev)
    os.chown(dst, st.st_uid, st.st_gid, follow_symlinks=False)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(dst, stat.S_IMODE(st.st_mode))
    _copy_xattrs(src, dst)
    if not stat.S_ISDIR(st.st_mode):
        os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def copy_tree(src: Path, dst: Path) -> None:
    """src and everything under it as dst (which must not exist), all fsynced."""
    copy_node(src, dst)
    if dst.is_dir() and not dst.is_symlink():
        for name in sorted(os.listdir(src)):
            copy_tree(src / name, dst / name)
        _finish_dir(src, dst)


def _finish_dir(src: Path, dst: Path) -> None:
    st = os.lstat(src)
    os.chmod(dst, stat.S_IMODE(st.st_mode))
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
    fsync_dir(dst)


def build(plan_: Plan, theirs: Path, ours: Path, dest: Path) -> None:
    """The merged tree at dest, from the plan (no stamp yet)."""
    dest.mkdir(mode=0o755)
    dirs: list[tuple[Path, Path]] = []
    for rel in sorted(plan_.take, key=lambda r: r.split("/")):
        src = (ours if plan_.take[rel] == "ours" else theirs) / rel
        copy_node(src, dest / rel)
        if (dest / rel).is_dir() and not (dest / rel).is_symlink():
            dirs.append((src, dest / rel))
    for rel in plan_.save_theirs:
        saved = dest / (rel + SAVED_SUFFIX)
        if os.path.lexists(saved):
            remove_tree(saved)
        copy_tree(theirs / rel, saved)
    for src, dst in reversed(dirs):  # children first: a directory's mtime and mode last
        if dst.is_dir() and not dst.is_symlink():
            _finish_dir(src, dst)
    os.chmod(dest, stat.S_IMODE(os.lstat(ours if ours.is_dir() else theirs).st_mode))
    fsync_dir(dest)


# --- stamps, conflicts, atomic files -----------------------------------------------------------

def os_release_version(text: str) -> str | None:
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "IMAGE_VERSION":
            return value.strip().strip("\"'") or None
    return None


def stamp_version(etc: Path) -> str | None:
    try:
        return os_release_version((etc / STAMP).read_text())
    except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError):
        return None


def read_conflicts(etc: Path) -> list[dict[str, str | None]]:
    try:
        data = json.loads((etc / CONFLICTS).read_text())
    except (FileNotFoundError, ValueError):
        return []
    return [c for c in data if isinstance(c, dict) and "path" in c]


def unresolved(etc: Path, conflicts: list[dict[str, str | None]]) -> list[dict[str, str | None]]:
    """A conflict stays until the owner deletes the saved new version (or reverts the file);
    one without a saved file (the new version removed it) until the local file is changed
    or removed."""
    left = []
    for c in conflicts:
        if c.get("saved"):
            if os.path.lexists(etc / str(c["saved"])):
                left.append(c)
        else:
            n = node(etc / str(c["path"]))
            if n is not None and (c.get("digest") is None or n.data == c.get("digest")):
                left.append(c)
    return left


def conflicts(etc: Path = Path("/etc")) -> list[dict[str, str | None]]:
    """The unresolved conflicts of this /etc, paths absolute, for `particle status`."""
    out = []
    for c in unresolved(etc, read_conflicts(etc)):
        out.append({
            "path": f"/etc/{c['path']}",
            "new_factory_version": f"/etc/{c['saved']}" if c.get("saved") else None,
            "reason": c.get("reason"),
            "since": c.get("since"),
        })
    return out


def write_conflicts(etc: Path, items: list[dict[str, str | None]]) -> None:
    if not items:
        if (etc / CONFLICTS).exists():
            (etc / CONFLICTS).unlink()
            fsync_dir(etc)
        return
    write_atomic(etc / CONFLICTS, (json.dumps(items, indent=1) + "\n").encode())


# --- the swap ------------------------------------------------------------------------------

RENAME_EXCHANGE = 2
LOADERS = ("/usr/lib64/ld-linux-x86-64.so.2", "/usr/lib/ld-linux-aarch64.so.1")


def exchange(a: Path, b: Path) -> None:
    """Swap two directories in one step (renameat2 RENAME_EXCHANGE): through ctypes where
    Python has it, otherwise coreutils' `mv --exchange` (python3-minimal has no ctypes)."""
    try:
        import ctypes
    except ImportError:
        # Through the dynamic loader: the initrd's chroot may have no /lib64 link yet.
        loader = [ld for ld in LOADERS if os.path.exists(ld)][:1]
        proc = subprocess.run([*loader, "/usr/bin/mv", "--exchange", "--no-target-directory",
                               str(a), str(b)], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise EtcError(f"cannot swap {a} and {b}: {proc.stderr.strip()}") from None
    else:
        libc = ctypes.CDLL(None, use_errno=True)
        at_fdcwd = -100
        if libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b),
                          RENAME_EXCHANGE) != 0:
            err = ctypes.get_errno()
            raise EtcError(f"cannot swap {a} and {b}: {os.strerror(err)}")


# --- at boot ----------------------------------------------------------------------------------

def crash_point(name: str) -> None:
    """Between the steps of a boot merge; the tests replace it to cut the power there."""


@dataclass
class Layout:
    root: Path

    @property
    def etc(self) -> Path:
        return self.root / "etc"

    @property
    def new(self) -> Path:
        return self.root / NEW_TREE

    @property
    def state(self) -> Path:
        return self.root / STATE

    @property
    def trash(self) -> Path:
        return self.state / "trash"

    def factory_copy(self, version: str) -> Path:
        return self.state / "factory" / version

    def saved(self, version: str) -> Path:
        return self.state / "saved" / version


def discard(lay: Layout, path: Path) -> None:
    """Remove a tree so that no power cut leaves part of it looking whole: it is first
    renamed into the trash (one step), then deleted."""
    if not os.path.lexists(path):
        return
    lay.trash.mkdir(parents=True, exist_ok=True)
    n = 0
    while os.path.lexists(lay.trash / str(n)):
        n += 1
    os.rename(path, lay.trash / str(n))
    fsync_dir(path.parent)
    remove_tree(lay.trash / str(n))
    with contextlib.suppress(OSError):
        lay.trash.rmdir()


def settle(lay: Layout) -> None:
    """Finish or undo what a power cut interrupted. A new tree without a stamp is unfinished:
    discarded. One with a stamp is a whole /etc of that version (built before the swap, or
    swapped out by it): kept as that version's saved /etc."""
    remove_tree(lay.trash)
    tmp = lay.state / "factory" / ".tmp"
    remove_tree(tmp)
    if not os.path.lexists(lay.new):
        return
    version = stamp_version(lay.new)
    if version is None or version == stamp_version(lay.etc):
        discard(lay, lay.new)
        return
    dest = lay.saved(version)
    dest.parent.mkdir(parents=True, exist_ok=True)
    discard(lay, dest)
    os.rename(lay.new, dest)
    fsync_dir(dest.parent)
    fsync_dir(lay.root)


def record_factory(lay: Layout, version: str) -> Path:
    """The running version's factory /etc, copied once (temp name, then renamed)."""
    dest = lay.factory_copy(version)
    if dest.is_dir():
        return dest
    tmp = lay.state / "factory" / ".tmp"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    remove_tree(tmp)
    copy_tree(lay.root / FACTORY, tmp)
    os.rename(tmp, dest)
    fsync_dir(dest.parent)
    return dest


def prune(lay: Layout, keep_saved: set[str], keep_factory: set[str]) -> None:
    """Only the /etc of the version just left is kept (A/B: the one other version that can
    boot), and the factory copies that are the bases of the kept trees."""
    for kind, keep in (("saved", keep_saved), ("factory", keep_factory)):
        d = lay.state / kind
        for entry in sorted(d.iterdir()) if d.is_dir() else []:
            if entry.name not in keep and not entry.name.startswith("."):
                discard(lay, entry)


def merge_into_new(lay: Layout, running: str, current: str) -> list[dict[str, str | None]]:
    """Build the merged tree (stamp last); returns its conflicts."""
    base_dir = lay.factory_copy(current)
    theirs_dir = lay.root / FACTORY
    base = scan(base_dir if base_dir.is_dir() else None)  # none: every difference conflicts
    theirs, ours = scan(theirs_dir), scan(lay.etc)
    p = plan(base, theirs, ours)
    discard(lay, lay.new)
    build(p, theirs_dir, lay.etc, lay.new)
    for c in p.conflicts:
        c["since"] = running
    superseded = {c["path"] for c in p.conflicts}
    # Conflicts of earlier merges the owner has not resolved yet stay listed.
    earlier = [c for c in unresolved(lay.new, read_conflicts(lay.etc))
               if c["path"] not in superseded]
    write_conflicts(lay.new, earlier + p.conflicts)
    crash_point("before-stamp")
    write_atomic(lay.new / STAMP, (lay.root / "usr/lib/os-release").read_bytes())
    fsync_dir(lay.root)
    return p.conflicts


def boot(root: Path) -> str:
    """What the initrd runs for the new root: nothing when /etc already belongs to the
    running version, otherwise restore that version's saved /etc or merge. Returns what it
    did, as one line for the console."""
    lay = Layout(root)
    running = os_release_version((root / "usr/lib/os-release").read_text())
    if running is None or not (root / FACTORY).is_dir():
        return "no IMAGE_VERSION or factory /etc in /usr: /etc left as it is"
    settle(lay)
    current = stamp_version(lay.etc)
    if current is None:
        return "/etc has no factory stamp (not populated yet): left as it is"
    record_factory(lay, running)
    if current == running:
        return f"/etc belongs to {running}"
    crash_point("start")
    saved = lay.saved(running)
    if stamp_version(saved) == running:
        os.rename(saved, lay.new)
        fsync_dir(saved.parent)
        fsync_dir(root)
        what = f"restored the /etc {running} had (the /etc of {current} is kept)"
    else:
        found = merge_into_new(lay, running, current)
        what = f"merged /etc from {current} into {running}: {len(found)} conflict(s)"
        what += "".join(f"; /etc/{c['path']} kept, new version in /etc/{c['saved']}"
                        if c["saved"] else f"; /etc/{c['path']} kept (removed in {running})"
                        for c in found)
    crash_point("built")
    exchange(lay.etc, lay.new)
    fsync_dir(root)
    crash_point("swapped")
    settle(lay)
    crash_point("settled")
    prune(lay, keep_saved={current}, keep_factory={running, current})
    return what


# --- the owner's view: diff and revert -------------------------------------------------------

@dataclass
class Change:
    path: str  # relative to /etc
    change: str  # added | removed | changed | mode | owner | type
    detail: str = ""


def changes(etc: Path, factory: Path, under: str = "") -> list[Change]:
    """What the owner changed in /etc against the factory /etc, below `under` (relative)."""
    ours, theirs = scan(etc), scan(factory)

    def wanted(rel: str) -> bool:
        return not under or rel == under or rel.startswith(under + "/")

    out: list[Change] = []
    for rel in sorted(set(ours) | set(theirs)):
        if not wanted(rel):
            continue
        o, t = ours.get(rel), theirs.get(rel)
        if o == t:
            continue
        if t is None:
            assert o is not None
            if os.path.dirname(rel) and os.path.dirname(rel) not in theirs and \
                    wanted(os.path.dirname(rel)):
                continue  # inside an added directory: the directory says it
            out.append(Change(rel, "added", o.kind))
        elif o is None:
            if os.path.dirname(rel) and os.path.dirname(rel) not in ours and \
                    wanted(os.path.dirname(rel)):
                continue
            out.append(Change(rel, "removed", t.kind))
        elif o.kind != t.kind:
            out.append(Change(rel, "type", f"{t.kind} -> {o.kind}"))
        elif o.data != t.data:
            detail = f"-> {o.data} (factory: {t.data})" if o.kind == "link" else ""
            out.append(Change(rel, "changed", detail))
        elif o.mode != t.mode:
            out.append(Change(rel, "mode", f"{t.mode:04o} -> {o.mode:04o}"))
        else:
            out.append(Change(rel, "owner", f"{t.uid}:{t.gid} -> {o.uid}:{o.gid}"))
    return out


def revert(etc: Path, factory: Path, rel: str) -> str:
    """Put the factory version of one path back (atomically: copied beside it, renamed over
    it); its saved new version and its conflict go with it."""
    src, dst = factory / rel, etc / rel
    if not os.path.lexists(src):
        raise EtcError(f"/etc/{rel} is not in this version's factory /etc (remove it "
                       "yourself if you do not want it)")
    if src.is_dir() and not src.is_symlink():
        raise EtcError(f"/etc/{rel} is a directory: revert the files in it one by one")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.particle-tmp")
    remove_tree(tmp)
    copy_node(src, tmp)
    if dst.is_dir() and not dst.is_symlink():
        exchange(tmp, dst)
        remove_tree(tmp)
    else:
        os.replace(tmp, dst)
    fsync_dir(dst.parent)
    saved = etc / (rel + SAVED_SUFFIX)
    if os.path.lexists(saved):
        remove_tree(saved)
    left = [c for c in read_conflicts(etc) if c["path"] != rel]
    if left != read_conflicts(etc):
        write_conflicts(etc, left)
    return f"/etc/{rel} restored from the factory"


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "boot":
        print("usage: python3 -m particleos.machine.etcmerge boot ROOT", file=sys.stderr)
        return 2
    try:
        what = boot(Path(argv[1]))
    except (OSError, EtcError) as err:
        print(f"particle: /etc merge failed, /etc left as it was: {err}", file=sys.stderr)
        return 1
    print(f"particle: {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

