"""Stage 9: the files an update server serves for this version, a manifest that says what is
inside, and SHA256SUMS; then everything is moved from staging into the output directory, the
index last, so a reader never sees an index that names a missing or half-written file."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .. import runner
from ..cache import fsync_path, write_atomic
from ..formats import SHA256SUMS, Manifest, format_sha256sums, read_sha256sums, sha256_file
from ..spec.summary import spec_digest
from .context import BuildContext


def installed_packages(tree: Path) -> dict[str, str]:
    out = runner.output(
        ["dpkg-query", f"--admindir={tree}/var/lib/dpkg", "-W", "-f=${Package}\t${Version}\n"],
        what="dpkg-query",
    )
    return dict(line.split("\t", 1) for line in out.splitlines() if "\t" in line)


def artifacts(ctx: BuildContext) -> None:
    assert ctx.tree and ctx.usr_image and ctx.verity_image and ctx.boot_uki and ctx.disk
    assert ctx.extra_artifacts is not None and ctx.extensions_info is not None
    staging = ctx.staging
    split = {
        f"{ctx.name}.usr.raw": ctx.usr_image,
        f"{ctx.name}.usr-verity.raw": ctx.verity_image,
        f"{ctx.name}.efi": ctx.boot_uki,
    }
    if ctx.verity_sig is not None:
        split[f"{ctx.name}.usr-verity-sig.raw"] = ctx.verity_sig
    ctx.sizes = part_sizes(ctx)
    for name, src in split.items():
        shutil.copyfile(src, staging / name)
    files = {ctx.disk.name: ctx.disk, **{n: staging / n for n in split}, **ctx.extra_artifacts}
    manifest = Manifest(
        id=ctx.image_id,
        version=ctx.version,
        release=ctx.spec.system.release,
        architecture=ctx.spec.system.architecture,
        kernel=ctx.kernel_version,
        usr_filesystem=ctx.spec.image.filesystem,
        root_hash=ctx.root_hash.hex(),
        spec_digest=spec_digest(ctx.spec),
        tree_key=ctx.tree_key,
        tree_path=ctx.tree_path,
        mirror=ctx.spec.system.mirror,
        sizes={name: path.stat().st_size for name, path in files.items()},
        packages=installed_packages(ctx.tree),
        extensions=ctx.extensions_info,
    )
    manifest_name = manifest.name
    write_atomic(staging / manifest_name, manifest.to_json())
    files[manifest_name] = staging / manifest_name
    # The sparse disk image is left out of the index: hashing gigabytes of zeros costs more
    # than the rest of a warm build, and updates never download it.
    sums = {name: sha256_file(path) for name, path in files.items() if path != ctx.disk}
    deliver(staging, ctx.output_dir, sums, extra=[ctx.disk.name])
    ctx.artifacts = {name: ctx.output_dir / name for name in files}


def part_sizes(ctx: BuildContext) -> dict[str, int]:
    """Bytes of each part of the build, for `particle build --json` (the disk apparent size)."""
    assert ctx.usr_image and ctx.verity_image and ctx.boot_uki and ctx.disk
    assert ctx.extensions_info is not None
    parts = {"usr": ctx.usr_image, "usr-verity": ctx.verity_image}
    if ctx.verity_sig is not None:
        parts["usr-verity-sig"] = ctx.verity_sig
    parts |= {"uki": ctx.boot_uki, "disk": ctx.disk}
    sizes = {name: path.stat().st_size for name, path in parts.items()}
    for name, info in ctx.extensions_info.items():
        sizes[f"extension-{name}"] = int(info["image_bytes"])
    return sizes


def deliver(staging: Path, output_dir: Path, sums: dict[str, str], extra: list[str]) -> None:
    """Rename staged files (indexed ones and `extra`) into the output directory, then rewrite
    its SHA256SUMS atomically; other versions kept in the directory stay listed."""
    output_dir.mkdir(parents=True, exist_ok=True)
    for name in [*extra, *sums]:
        os.replace(staging / name, output_dir / name)
    fsync_path(output_dir)
    index = output_dir / SHA256SUMS
    entries = {n: d for n, d in read_sha256sums(index).items() if (output_dir / n).exists()}
    entries.update(sums)
    write_atomic(index, format_sha256sums(entries))
