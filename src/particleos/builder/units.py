"""systemd units the build puts into /usr (so every version carries its own), enabled the way
`systemctl enable` would: a relative symlink in TARGET.wants (or .requires)."""

from __future__ import annotations

import os
from pathlib import Path

UNIT_DIR = "usr/lib/systemd/system"


def symlink(target: str, link: Path) -> None:
    """Make `link` a symlink to `target`, replacing whatever is there."""
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(target, link)


def enable(tree: Path, unit: str, target: str, how: str = "wants") -> None:
    """`unit` (in /usr/lib/systemd/system) pulled in by `target` (how: wants or requires)."""
    symlink(f"../{unit}", tree / UNIT_DIR / f"{target}.{how}" / unit)


def install_unit(tree: Path, unit: str, content: str | bytes, wanted_by: str) -> Path:
    """Write `unit` into /usr/lib/systemd/system and have `wanted_by` want it."""
    path = tree / UNIT_DIR / unit
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        path.write_text(content)
    else:
        path.write_bytes(content)
    enable(tree, unit, wanted_by)
    return path
