"""Install the machine-side `particle` command into the image: the stdlib-only
`particleos.machine` package and `particleos.formats` under /usr/lib/particleos and a
/usr/bin/particle launcher; and the root partition's repart definition, which makes a disk's
root grow at its first boot, appear where it is missing, and go on a factory reset."""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

from .context import BuildContext
from .encryption import ROOT_DEFINITION as ROOT_DEFINITION_PATH

# The one root definition (usr/lib/repart.d/50-root.conf, encryption.ROOT_DEFINITION): this
# plain one, or the encryption stage's for an encrypted root.
ROOT_DEFINITION = Path(ROOT_DEFINITION_PATH).name
# systemd enables repart in the real root too (sysinit.target): with root mounted it has nothing
# left to do after the initrd's run, and under load it delayed udev enough that /dev/ttyS0 timed
# out in our tests.
REPART_INITRD_ONLY = """[Unit]
# Written by ParticleOS: root is grown, created or reset by the initrd's run only.
ConditionPathExists=/etc/initrd-release
"""
LAUNCHER = """#!/usr/bin/python3
# ParticleOS machine-side command (installed by `particle build`).
import sys

sys.path.insert(0, "/usr/lib/particleos")
from particleos.machine.cli import main

sys.exit(main())
"""


def install_machine_tools(ctx: BuildContext) -> None:
    assert ctx.tree is not None
    dest = ctx.tree / "usr/lib/particleos/particleos"
    if dest.exists():
        shutil.rmtree(dest)
    (dest / "machine").mkdir(parents=True)
    (dest / "__init__.py").write_text('"""ParticleOS (machine side only)."""\n')
    package = resources.files("particleos")
    for entry in (package / "machine").iterdir():
        if entry.name.endswith(".py"):
            (dest / "machine" / entry.name).write_bytes(entry.read_bytes())
    # The on-disk formats the machine side shares with the builder.
    (dest / "formats.py").write_bytes((package / "formats.py").read_bytes())
    launcher = ctx.tree / "usr/bin/particle"
    launcher.write_text(LAUNCHER)
    launcher.chmod(0o755)
    # In /usr (read by repart in the initrd from /sysusr/usr): every version carries its own.
    if ctx.spec.image.encrypt == "off":  # else the encryption stage writes the definition
        dest = ctx.tree / ROOT_DEFINITION_PATH
        dest.parent.mkdir(parents=True, exist_ok=True)
        definition = resources.files("particleos") / "data" / "repart" / ROOT_DEFINITION
        dest.write_bytes(definition.read_bytes())
    dropin = ctx.tree / "usr/lib/systemd/system/systemd-repart.service.d"
    dropin.mkdir(parents=True, exist_ok=True)
    (dropin / "50-particle-initrd-only.conf").write_text(REPART_INITRD_ONLY)
