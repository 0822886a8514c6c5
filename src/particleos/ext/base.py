"""The base of an extension built after the fact (`particle ext build --base BUILD_DIR`): the
build's own usr image is the exact /usr the machine runs, and that /usr carries the rest of the
configured root too (/etc and /var are kept under /usr/share/factory by the hermetic stage), so
the whole base tree is recovered from one file: no cache, no spec, no rebuild needed."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .. import runner
from ..errors import ParticleError
from ..formats import Manifest, build_manifests
from ..tools import ToolsTree
from .builder import BaseInfo

# Top-level entries of a merged-/usr Debian root besides usr, etc and var.
ROOT_LINKS = {"bin": "usr/bin", "sbin": "usr/sbin", "lib": "usr/lib", "lib64": "usr/lib64"}
ROOT_DIRS = ("boot", "dev", "home", "media", "mnt", "opt", "proc", "root", "run", "srv", "sys",
             "tmp")


@dataclass(frozen=True)
class BuiltBase:
    info: BaseInfo
    usr_image: Path
    manifest: Manifest


def find_base(build_dir: Path, version: str | None = None) -> BuiltBase:
    """The build in `build_dir` (its newest version, or `version`) from its manifest."""
    found = [(path, m) for path, m in build_manifests(build_dir)
             if version is None or m.version == version]
    if not found:
        of = f" of version {version}" if version else ""
        raise ParticleError(
            f"{build_dir}: no build{of} here (no *.manifest.json); run `particle build` first"
        )
    found.sort(key=lambda t: t[0].stat().st_mtime)
    _, manifest = found[-1]
    usr = build_dir / f"{manifest.stem}.usr.raw"
    if not usr.is_file():
        raise ParticleError(f"{build_dir}: {usr.name} is missing: the base /usr is needed")
    filesystem = manifest.usr_filesystem
    info = BaseInfo(
        image_id=manifest.id, version=manifest.version, release=manifest.release,
        kernel=manifest.kernel, architecture=manifest.architecture,
        filesystem=filesystem, compression="lz4hc" if filesystem == "erofs" else "zstd",
    )
    return BuiltBase(info=info, usr_image=usr, manifest=manifest)


def extract_usr(tools: ToolsTree, image: Path, filesystem: str, *dests: Path) -> None:
    """Unpack a usr image (erofs or squashfs) into each of `dests`, owners and modes kept.
    Two copies are unpacked side by side (one to install into, one pristine to compare with):
    on two cores that is about twice as fast as unpacking once and copying."""
    def one(dest: Path) -> None:
        if filesystem == "erofs":
            argv = ["fsck.erofs", f"--extract={dest}", "--preserve", str(image)]
        else:
            argv = ["unsquashfs", "-quiet", "-no-progress", "-d", str(dest), str(image)]
        tools.run(argv, binds=[image.parent, dest.parent], what=f"extract of {image.name}")

    with ThreadPoolExecutor(max_workers=2) as pool:
        for future in [pool.submit(one, d) for d in dests]:
            future.result()


def root_from_usr(usr: Path, root: Path) -> None:
    """Make `root` a whole base tree from a configured /usr: usr itself (copied, unless
    `root/usr` is already there), /etc and /var from the factory copies, the merged-/usr links
    and the empty mount points."""
    root.mkdir(exist_ok=True)
    os.chmod(root, 0o755)
    if not (root / "usr").exists():
        runner.run(["cp", "-a", "--reflink=auto", str(usr), str(root / "usr")],
                   what="copy of /usr")
    for name in ("etc", "var"):
        factory = usr / "share/factory" / name
        if not factory.is_dir():
            raise ParticleError(
                f"the base /usr has no share/factory/{name}: not a ParticleOS usr image"
            )
        runner.run(["cp", "-a", "--reflink=auto", str(factory), str(root / name)],
                   what=f"copy of factory /{name}")
    for name, target in ROOT_LINKS.items():
        if (usr / target.removeprefix("usr/")).exists():
            (root / name).symlink_to(target)
    for name in ROOT_DIRS:
        (root / name).mkdir(exist_ok=True)
    os.chmod(root / "tmp", 0o1777)
