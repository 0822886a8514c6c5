"""File system images for the disk: the FAT32 ESP and the ext4 root, built as reproducibly as
the host tools allow (fixed IDs, seeds and timestamps) and written atomically."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Final
from uuid import UUID

from .. import runner
from ..cache import atomic_file
from ..errors import ParticleError
from .sizes import KiB, MiB, align_up, format_size

# Below ~33 MiB a FAT32 with 512-byte clusters has fewer than the 65525 clusters the FAT spec
# requires (mkfs.fat 4.2 only warns); the UEFI spec wants FAT32 on fixed disks, so grow instead.
FAT32_MIN_SIZE: Final = 33 * MiB
# Used when neither `epoch` nor SOURCE_DATE_EPOCH is given: a fixed time, not "now", so the
# same inputs give the same bytes by default. 2024-01-01T00:00:00Z.
DEFAULT_EPOCH: Final = 1704067200
_FAT_EPOCH = 315532800  # 1980-01-01: FAT cannot store an earlier date
_EXT4_BLOCK = 4096


def source_date_epoch(epoch: int | None = None) -> int:
    """The timestamp to stamp into images: `epoch`, else $SOURCE_DATE_EPOCH, else DEFAULT_EPOCH."""
    if epoch is not None:
        return epoch
    raw = os.environ.get("SOURCE_DATE_EPOCH")
    if raw is None:
        return DEFAULT_EPOCH
    try:
        return int(raw)
    except ValueError:
        raise ParticleError(
            f"SOURCE_DATE_EPOCH={raw!r} is not a whole number of seconds since 1970"
        ) from None


def make_esp(
    path: Path,
    size: int,
    files: dict[str, Path],
    label: str = "ESP",
    volume_id: int | None = None,
    *,
    epoch: int | None = None,
) -> None:
    """Create a FAT32 ESP image holding `files` (ESP path such as "/EFI/BOOT/BOOTX64.EFI" ->
    host file). `size` is a minimum: it is rounded up to 1 MiB and to at least FAT32_MIN_SIZE.

    512-byte sectors because OVMF ignores a small FAT32 made with 4096-byte ones. Byte-identical
    for the same inputs: --invariant fixes mkfs.fat's serial and times, and mtools stamps files
    with SOURCE_DATE_EPOCH in UTC (FAT stores local time, so TZ is pinned).
    """
    if not (label and len(label) <= 11 and label.isascii() and label.isprintable()):
        raise ParticleError(f"ESP label {label!r} must be 1-11 printable ASCII characters")
    if volume_id is not None and not 0 <= volume_id <= 0xFFFFFFFF:
        raise ParticleError(f"ESP volume id {volume_id:#x} does not fit in 32 bits")
    dests = {_esp_path(dest): src for dest, src in files.items()}
    for dest, src in dests.items():
        if not src.is_file():
            raise ParticleError(f"file for the ESP's {dest} not found: {src}")
    size = max(align_up(size, MiB), FAT32_MIN_SIZE)
    stamp = max(source_date_epoch(epoch), _FAT_EPOCH)
    env = {"TZ": "UTC", "SOURCE_DATE_EPOCH": str(stamp), "MTOOLS_SKIP_CHECK": "1"}
    # --mbr=n: no fake MBR in the boot sector, so nothing mistakes the ESP for a partitioned disk.
    mkfs = ["mkfs.vfat", "-F", "32", "-S", "512", "-n", label.upper(), "--invariant", "--mbr=n"]
    if volume_id is not None:
        mkfs += ["-i", f"{volume_id:08X}"]
    with atomic_file(path) as tmp:
        runner.run([*mkfs, "-C", tmp, str(size // KiB)], env=env, what="mkfs.vfat (ESP)")
        dirs = _parent_dirs(dests)
        if dirs:
            runner.run(
                ["mmd", "-i", tmp, *(f"::{d}" for d in dirs)], env=env, what="mmd (ESP directories)"
            )
        for dest in sorted(dests):
            runner.run(
                ["mcopy", "-i", tmp, "-D", "o", dests[dest], f"::{dest}"],
                env=env,
                what=f"mcopy (ESP {dest})",
            )


def make_ext4(
    path: Path,
    size: int,
    label: str,
    uuid: UUID,
    root_dir: Path | None = None,
    *,
    epoch: int | None = None,
) -> None:
    """Create an ext4 image of `size` bytes (rounded down to 4 KiB), optionally filled from
    `root_dir`.

    4 KiB blocks and the "default" usage type even when small: this root is grown at first
    boot, and mke2fs's "small" profile (1 KiB blocks, few inodes) would follow it there.
    Byte-identical for the same inputs without `root_dir` (fixed UUID, hash seed and time);
    with `root_dir` the files' own times (ctime included) are copied, so only as
    reproducible as the tree.
    """
    if not label or len(label.encode()) > 16:
        raise ParticleError(f"ext4 label {label!r} must be 1-16 bytes")
    size -= size % _EXT4_BLOCK
    if size < MiB:
        raise ParticleError(f"ext4 image size {format_size(size)} is too small (at least 1 MiB)")
    if root_dir is not None and not root_dir.is_dir():
        raise ParticleError(f"ext4 content directory {root_dir} does not exist")
    stamp = source_date_epoch(epoch)
    # e2fsprogs 1.47.0 (bookworm) only knows E2FSPROGS_FAKE_TIME; 1.47.1+ reads SOURCE_DATE_EPOCH.
    env = {"E2FSPROGS_FAKE_TIME": str(stamp), "SOURCE_DATE_EPOCH": str(stamp)}
    opts = f"root_owner=0:0,lazy_itable_init=1,nodiscard,hash_seed={uuid}"
    argv: list[str | os.PathLike[str]] = [
        "mkfs.ext4",
        "-q",
        "-L",
        label,
        "-U",
        str(uuid),
        "-b",
        str(_EXT4_BLOCK),
        "-T",
        "default",
        "-E",
        opts,
    ]
    if root_dir is not None:
        argv += ["-d", root_dir]
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            f.truncate(size)  # sparse, and already zero where mke2fs skips writing
        runner.run([*argv, tmp, f"{size // KiB}k"], env=env, what="mkfs.ext4")


def _esp_path(dest: str) -> str:
    p = PurePosixPath(dest)
    if not p.is_absolute() or ".." in p.parts or len(p.parts) < 2:
        raise ParticleError(
            f"ESP path {dest!r} must be an absolute file path such as /EFI/BOOT/BOOTX64.EFI"
        )
    return str(p)


def _parent_dirs(dests: dict[str, Path]) -> list[str]:
    """Directories to create, parents first; FAT is case-insensitive, so dedupe by case."""
    found: dict[str, str] = {}
    for dest in dests:
        for parent in PurePosixPath(dest).parents:
            if str(parent) != "/":
                found.setdefault(str(parent).casefold(), str(parent))
    return sorted(found.values(), key=lambda d: (d.count("/"), d.casefold()))
