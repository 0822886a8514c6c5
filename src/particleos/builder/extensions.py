"""System extensions in the build: every image can merge extensions at boot (systemd-sysext
and the version selection of `particle ext sync` are enabled), and each `[extensions.NAME]` of
the spec becomes `<id>-<NAME>_<version>.raw`, built against this build's exact tree."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..ext.builder import BaseInfo, build_extension
from ..ext.image import VeritySigner
from ..machine.sysext import STORE_DIR, artifact_name
from ..runner import run
from ..ui import ui
from .context import BuildContext

SYNC_UNIT = "particle-ext-sync.service"
SYNC_UNIT_TEXT = f"""\
# Installed by ParticleOS: after an update or a rollback, point each extension at the version
# built for the booted base before systemd-sysext merges them.
[Unit]
Description=Select the system extension versions of the booted ParticleOS version
DefaultDependencies=no
After=local-fs.target
Before=systemd-sysext.service sysinit.target shutdown.target
Conflicts=shutdown.target
ConditionDirectoryNotEmpty={STORE_DIR}

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/bin/particle ext sync

[Install]
WantedBy=sysinit.target
"""


def sysext_support(ctx: BuildContext) -> None:
    """Enable systemd-sysext.service (Debian ships it disabled) and our sync unit, so that
    extensions in /var/lib/extensions are merged on every boot."""
    assert ctx.tree is not None
    unit = ctx.tree / "usr/lib/systemd/system" / SYNC_UNIT
    unit.write_text(SYNC_UNIT_TEXT)
    run(["systemctl", f"--root={ctx.tree}", "enable", "systemd-sysext.service", SYNC_UNIT],
        what="systemctl enable systemd-sysext.service")


def extensions(ctx: BuildContext) -> None:
    """Build every `[extensions.NAME]` into the staging directory; artifacts() publishes them
    with the rest and lists them in SHA256SUMS and the manifest."""
    assert ctx.tree is not None
    staged: dict[str, Path] = {}
    info: dict[str, dict[str, Any]] = {}
    ctx.extra_artifacts, ctx.extensions_info = staged, info
    if not ctx.spec.extensions:
        return
    img = ctx.spec.image
    base = BaseInfo(
        image_id=ctx.image_id, version=ctx.version, release=ctx.spec.system.release,
        kernel=ctx.kernel_version, architecture=ctx.spec.system.architecture,
        filesystem=img.filesystem, compression=img.compression,
    )
    for name, ext in ctx.spec.extensions.items():
        fname = artifact_name(ctx.image_id, name, ctx.version)
        ui.info(f"  extension {name}: {' '.join(ext.packages)}")
        result = build_extension(
            name=name, packages=list(ext.packages), base=base, base_root=ctx.tree,
            base_usr=ctx.tree / "usr", out=ctx.staging / fname, work=ctx.work_dir,
            tools=ctx.tools, signer=signer(ctx),
        )
        ui.info(f"    {fname}: {result.image_bytes / 2**20:.1f} MiB, {result.files} entries, "
                f"{len(result.packages)} packages, {result.seconds:.0f} s")
        staged[fname] = result.path
        info[name] = result.to_json()


def signer(ctx: BuildContext) -> VeritySigner | None:
    """Signed builds (`[signing]`) sign their extensions' root hashes with the same key, so
    systemd verifies them against the same certificate as the base's /usr."""
    try:
        from ..signing import verity_signature_partition
        from .trust import key_pair
    except ImportError:  # the signing stage is not part of this tree
        return None
    pair = key_pair(ctx.spec)
    if pair is None:
        return None
    return lambda root_hash: verity_signature_partition(pair, root_hash)
