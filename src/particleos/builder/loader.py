"""Build side of boot loader updates (the rule is in machine/loader.py): the systemd-boot a
version ships in /usr (the release's, or the spec's `[boot] loader`), the unit that installs it
onto the ESP after a good boot, and Debian's systemd-boot-update.service masked, because it
would install a newer loader at every boot, also on a boot still being tried."""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

from .context import BuildContext
from .units import install_unit, symlink

SDBOOT = "usr/lib/systemd/boot/efi/systemd-bootx64.efi"
UNIT = "usr/lib/systemd/system/particle-loader.service"
BOOT_UPDATE = "usr/lib/systemd/system/systemd-boot-update.service"


def ship_loader(ctx: BuildContext) -> Path:
    """Put the loader in place and wire its update; returns the tree's systemd-boot."""
    assert ctx.tree is not None
    sdboot = ctx.tree / SDBOOT
    if ctx.spec.boot.loader is not None:  # spec.checks: an existing systemd-boot binary
        sdboot.parent.mkdir(parents=True, exist_ok=True)
        sdboot.unlink(missing_ok=True)
        shutil.copyfile(ctx.spec.boot.loader, sdboot)
        sdboot.chmod(0o644)
    data = resources.files("particleos") / "data" / "loader"
    install_unit(ctx.tree, Path(UNIT).name, (data / "particle-loader.service").read_bytes(),
                 "multi-user.target")
    # Masked where the vendor unit lives: first-boot preset-all cannot enable it again.
    symlink("/dev/null", ctx.tree / BOOT_UPDATE)
    for d in ("etc/systemd/system", "usr/lib/systemd/system"):
        (ctx.tree / d / "sysinit.target.wants/systemd-boot-update.service").unlink(missing_ok=True)
    return sdboot

