"""Install the machine-side `particle` command into the image: the stdlib-only
`particleos.machine` package and `particleos.formats` under /usr/lib/particleos and a
/usr/bin/particle launcher. (The root partition's repart definition: repart.py.)"""

from __future__ import annotations

import shutil
from importlib import resources

from .context import BuildContext

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
