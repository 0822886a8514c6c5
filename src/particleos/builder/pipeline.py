"""The build pipeline, top to bottom. Each stage is a function over the BuildContext; work
happens in a private work directory and outputs reach the output directory only at the end."""

from __future__ import annotations

import datetime
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..cache import cache_root, remove_tree
from ..spec import Spec
from ..tools import ToolsTree
from ..ui import ui
from .artifacts import artifacts
from .bootstrap import bootstrap
from .configure import configure
from .context import BuildContext
from .extensions import extensions, sysext_support
from .hermetic import hermetic
from .images import boot_files, build_uki, disk_image, verity
from .machine import install_machine_tools
from .trust import install_trust, sign_uki, sign_verity
from .updates import update_definitions
from .usrimage import usr_image

Stage = Callable[[BuildContext], None]

STAGES: list[tuple[str, Stage]] = [
    ("bootstrap: Debian tree (cached)", bootstrap),
    ("configure: users, services, files", configure),
    ("trust anchors: certificate, update keyring, signed boot loader", install_trust),
    ("updates: sysupdate transfers, boot assessment", update_definitions),
    ("machine-side particle command", install_machine_tools),
    ("system extensions: merged at boot", sysext_support),
    ("kernel and initrd", boot_files),
    ("hermetic /usr and factory /etc", hermetic),
    ("usr file system image", usr_image),
    ("dm-verity hash tree", verity),
    ("verity signature", sign_verity),
    ("unified kernel image", build_uki),
    ("Secure Boot signature of the UKI", sign_uki),
    ("GPT disk image", disk_image),
    ("extensions: sysext images from the spec", extensions),
    ("update artifacts and SHA256SUMS", artifacts),
]


@dataclass
class BuildResult:
    id: str
    version: str
    output_dir: Path
    disk: Path
    artifacts: dict[str, Path]
    root_hash: str
    kernel: str
    cache_hit: bool
    tree_path: str
    sizes: dict[str, int]
    timings: dict[str, float]

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "version": self.version,
            "output_dir": str(self.output_dir),
            "disk": str(self.disk),
            "artifacts": {k: str(v) for k, v in self.artifacts.items()},
            "root_hash": self.root_hash,
            "kernel": self.kernel,
            "cache_hit": self.cache_hit,
            "tree_path": self.tree_path,
            "sizes": self.sizes,
            "timings": self.timings,
        }


def resolve_version(spec: Spec) -> str:
    v = spec.system.version
    if v == "auto":
        return datetime.datetime.now(datetime.UTC).strftime("%Y%m%d%H%M%S")
    return v


def build(spec: Spec, output_dir: Path, version: str | None = None) -> BuildResult:
    """Run every stage; on any failure or interrupt the output directory is left as it was."""
    version = version or resolve_version(spec)
    output_dir = output_dir.resolve()
    work = cache_root() / "work" / f"{spec.system.id}_{version}-{uuid.uuid4().hex[:8]}"
    ctx = BuildContext(
        spec=spec, version=version, output_dir=output_dir, work_dir=work,
        tools=ToolsTree(spec.system.mirror),
    )
    timings: dict[str, float] = {}
    work.mkdir(parents=True)
    try:
        ctx.staging.mkdir()
        ctx.tools.ensure()
        for title, stage in STAGES:
            start = len(ui.timings)
            with ui.step(title):
                stage(ctx)
            timings[title.split(":")[0]] = round(ui.timings[start][1], 2)
    finally:
        remove_tree(work)
    assert ctx.disk is not None
    return BuildResult(
        id=ctx.image_id, version=version, output_dir=output_dir,
        disk=output_dir / ctx.disk.name, artifacts=ctx.artifacts,
        root_hash=ctx.root_hash.hex(), kernel=ctx.kernel_version, cache_hit=ctx.cache_hit,
        tree_path=ctx.tree_path, sizes=ctx.sizes, timings=timings,
    )


def clean(output_dirs: list[Path], caches: bool) -> list[Path]:
    """Remove build outputs (and with caches=True the tree, tools and apt caches)."""
    removed: list[Path] = []
    for d in output_dirs:
        if d.exists():
            shutil.rmtree(d)
            removed.append(d)
    if caches and cache_root().exists():
        shutil.rmtree(cache_root())
        removed.append(cache_root())
    return removed
