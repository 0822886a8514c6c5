"""Stage 3: make /usr self-sufficient. Everything the OS needs must be inside the verity-
protected /usr: enablement links move from /etc into /usr, and /etc and /var are kept as a
factory copy under /usr/share/factory that the initrd copies onto an empty root partition."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .. import runner
from ..cache import remove_tree
from .context import BuildContext
from .units import symlink

# Parts of /var that are caches or host state of the build, not part of the OS.
VAR_DROP = (
    "cache/apt",
    "cache/debconf/templates.dat-old",
    "lib/apt/lists",
    "log",
    "tmp",
)


def hermetic(ctx: BuildContext) -> None:
    assert ctx.tree is not None
    root = ctx.tree
    move_enablement_links(root)
    for stale in ("etc/machine-id", "var/lib/dbus/machine-id", "etc/.particle-factory",
                  "etc/.pwd.lock", "etc/passwd-", "etc/shadow-", "etc/group-", "etc/gshadow-"):
        p = root / stale
        if p.exists() or p.is_symlink():
            p.unlink()
    for rel in VAR_DROP:
        remove_tree(root / "var" / rel)
    factory = root / "usr/share/factory"
    factory.mkdir(parents=True, exist_ok=True)
    for name in ("etc", "var"):
        remove_tree(factory / name)
        runner.run(["cp", "-a", str(root / name), str(factory / name)], what=f"factory /{name}")
    # Kernel and initrd live in the UKI, not in /usr/boot; keep /boot out of the image.
    remove_tree(root / "boot")
    (root / "boot").mkdir()


def move_enablement_links(root: Path) -> None:
    """Move *.wants/*.requires links from /etc/systemd/system to /usr/lib/systemd/system, so
    a unit enabled by the image is enabled on every boot and by every later version."""
    etc_units = root / "etc/systemd/system"
    usr_units = root / "usr/lib/systemd/system"
    if not etc_units.is_dir():
        return
    for dep_dir in sorted(etc_units.iterdir()):
        if not dep_dir.is_dir() or dep_dir.is_symlink():
            continue
        if not dep_dir.name.endswith((".wants", ".requires", ".upholds")):
            continue
        for link in sorted(dep_dir.iterdir()):
            if not link.is_symlink():
                continue
            target = os.readlink(link)
            unit = Path(target).name
            if not (usr_units / unit).exists() and not _template_exists(usr_units, unit):
                continue  # a unit defined in /etc stays enabled from /etc
            symlink(f"../{unit}", usr_units / dep_dir.name / link.name)
            link.unlink()
        if not any(dep_dir.iterdir()):
            dep_dir.rmdir()


def _template_exists(units: Path, unit: str) -> bool:
    if "@" not in unit:
        return False
    prefix, rest = unit.split("@", 1)
    suffix = rest.rsplit(".", 1)[-1]
    return (units / f"{prefix}@.{suffix}").exists()


def copy_boot_files(ctx: BuildContext, dest: Path) -> tuple[Path, Path]:
    """Kernel and initrd out of /boot (before hermetic() empties it)."""
    assert ctx.tree is not None
    kv = ctx.kernel_version
    vmlinuz = dest / "vmlinuz"
    initrd = dest / "initrd"
    shutil.copyfile(ctx.tree / f"boot/vmlinuz-{kv}", vmlinuz)
    shutil.copyfile(ctx.tree / f"boot/initrd.img-{kv}", initrd)
    return vmlinuz, initrd
