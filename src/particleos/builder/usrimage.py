"""Stage 5: the read-only /usr file system image, reproducible: fixed timestamps, a UUID
derived from id and version, files owned by root."""

from __future__ import annotations

import os

from .. import runner  # noqa: F401  (kept for symmetry: every tool goes through the runner)
from ..store.layout import erofs_layout_options
from .context import BuildContext

SOURCE_DATE_EPOCH = "0"
BLOCK = 4096  # dm-verity's data block size



def usr_image(ctx: BuildContext) -> None:
    assert ctx.tree is not None
    img = ctx.spec.image
    out = ctx.work_dir / "usr.img"
    usr = ctx.tree / "usr"
    env = {"SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH}
    if img.filesystem == "erofs":
        argv = ["mkfs.erofs", "--quiet", "-T", SOURCE_DATE_EPOCH, "--all-root",
                "-U", str(ctx.stable_uuid("usr-fs")), *erofs_layout_options(img.compression),
                str(out), str(usr)]
    else:
        argv = ["mksquashfs", str(usr), str(out), "-noappend", "-all-root", "-quiet",
                "-no-progress", "-mkfs-time", SOURCE_DATE_EPOCH, "-all-time", SOURCE_DATE_EPOCH]
        if img.compression == "none":
            argv += ["-noI", "-noD", "-noF", "-noX"]
        else:
            argv += ["-comp", str(img.compression)]
    ctx.tools.run(argv, binds=[ctx.work_dir], env=env, what=f"mkfs of /usr ({img.filesystem})")
    size = out.stat().st_size
    if size % BLOCK:  # verity covers whole blocks only: pad so that no byte is unprotected
        os.truncate(out, size + BLOCK - size % BLOCK)
    ctx.usr_image = out
