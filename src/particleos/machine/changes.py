"""What changes between two versions, from their build manifests: packages added, removed,
upgraded and downgraded (Debian version order), the kernel, and the sizes of what an update
downloads. `particle diff BUILD_A BUILD_B` prints it on the host (rpm-ostree `db diff` and
NixOS `nvd diff` are the anchors); it is standard library only so that the machine can show
the same preview of an update from the manifests its update source publishes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..formats import PART_SUFFIXES, Manifest

# Files of a version that an update downloads (the disk image and the manifest are not).


def _order(c: str) -> int:
    """dpkg's order of one non-digit character: '~' first, then the end, letters, the rest."""
    if c == "~":
        return -1
    if not c:
        return 0
    if c.isalpha():
        return ord(c)
    return ord(c) + 256


def _compare_part(a: str, b: str) -> int:
    """dpkg's comparison of an upstream version or a Debian revision."""
    i = j = 0
    while i < len(a) or j < len(b):
        while (i < len(a) and not a[i].isdigit()) or (j < len(b) and not b[j].isdigit()):
            ca = a[i] if i < len(a) and not a[i].isdigit() else ""
            cb = b[j] if j < len(b) and not b[j].isdigit() else ""
            if _order(ca) != _order(cb):
                return -1 if _order(ca) < _order(cb) else 1
            i += 1 if ca else 0
            j += 1 if cb else 0
            if not ca and not cb:
                break
        na = nb = ""
        while i < len(a) and a[i].isdigit():
            na += a[i]
            i += 1
        while j < len(b) and b[j].isdigit():
            nb += b[j]
            j += 1
        if int(na or 0) != int(nb or 0):
            return -1 if int(na or 0) < int(nb or 0) else 1
    return 0


def _split(version: str) -> tuple[int, str, str]:
    epoch, _, rest = version.partition(":") if ":" in version else ("0", "", version)
    upstream, _, revision = rest.rpartition("-") if "-" in rest else (rest, "", "")
    return int(epoch or 0), upstream, revision


def debian_vercmp(a: str, b: str) -> int:
    """-1, 0 or 1 as Debian version a is older than, equal to or newer than b (as
    `dpkg --compare-versions` decides: epoch, upstream version, Debian revision)."""
    ea, ua, ra = _split(a)
    eb, ub, rb = _split(b)
    if ea != eb:
        return -1 if ea < eb else 1
    return _compare_part(ua, ub) or _compare_part(ra, rb)


@dataclass
class Changes:
    old: str  # versions of the two builds
    new: str
    added: dict[str, str] = field(default_factory=dict)  # package -> version
    removed: dict[str, str] = field(default_factory=dict)
    upgraded: dict[str, tuple[str, str]] = field(default_factory=dict)  # package -> (old, new)
    downgraded: dict[str, tuple[str, str]] = field(default_factory=dict)
    kernel: tuple[str, str] | None = None  # (old, new) when it changed
    download_bytes: int = 0  # what a full update to `new` downloads

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.upgraded or self.downgraded
                    or self.kernel)

    def to_json(self) -> dict[str, Any]:
        return {
            "old": self.old, "new": self.new, "added": self.added, "removed": self.removed,
            "upgraded": {k: list(v) for k, v in self.upgraded.items()},
            "downgraded": {k: list(v) for k, v in self.downgraded.items()},
            "kernel": list(self.kernel) if self.kernel else None,
            "download_bytes": self.download_bytes,
        }

    def render(self, download: bool = True) -> str:
        lines = [f"{self.old} -> {self.new}"]
        if self.kernel:
            lines.append(f"kernel: {self.kernel[0]} -> {self.kernel[1]}")
        for title, entries in (("added", self.added), ("removed", self.removed)):
            if entries:
                lines.append(f"{title} ({len(entries)}):")
                lines += [f"  {name} {ver}" for name, ver in sorted(entries.items())]
        for title, pairs in (("upgraded", self.upgraded), ("downgraded", self.downgraded)):
            if pairs:
                lines.append(f"{title} ({len(pairs)}):")
                lines += [f"  {name} {a} -> {b}" for name, (a, b) in sorted(pairs.items())]
        if self.empty:
            lines.append("no package changes")
        if download:
            lines.append(f"full update download: {self.download_bytes / 2**20:.1f} MiB")
        return "\n".join(lines)


def compare(old: Manifest, new: Manifest) -> Changes:
    """The changes from build `old` to build `new`."""
    changes = Changes(old.version, new.version)
    for name, version in new.packages.items():
        before = old.packages.get(name)
        if before is None:
            changes.added[name] = version
        elif before != version:
            side = changes.upgraded if debian_vercmp(before, version) < 0 else changes.downgraded
            side[name] = (before, version)
    changes.removed = {n: v for n, v in old.packages.items() if n not in new.packages}
    if old.kernel != new.kernel:
        changes.kernel = (old.kernel, new.kernel)
    changes.download_bytes = sum(size for name, size in new.sizes.items()
                                 if name.endswith(PART_SUFFIXES))
    return changes
