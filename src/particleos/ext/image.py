"""Pack an extension's /usr into a Discoverable Disk Image that systemd-sysext and
systemd-dissect accept: GPT with a usr partition (erofs or squashfs), its usr-verity hash
partition, and a usr-verity-sig partition when the build signs. As for the base, the partition
UUIDs are the first and last 128 bits of the verity root hash: that is how systemd pairs the
two partitions and checks them against the root hash it is given (`NAME.usrhash` next to the
image, or the signature partition)."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

from .. import disk, formats
from ..disk import ATTR_READ_ONLY, Partition, PartType, align_up
from ..store.layout import erofs_layout_options
from ..tools import ToolsTree
from ..verity import format_verity, verity_uuids

SOURCE_DATE_EPOCH = "0"
BLOCK = 4096

# Hook for signed builds (issue 5): given the root hash (hex), return the contents of the
# usr-verity-sig partition (signing.verity_signature_partition() makes them), or None.
VeritySigner = Callable[[str], bytes | None]


@dataclass(frozen=True)
class PackedImage:
    path: Path
    root_hash: str
    usr_size: int  # bytes of the file system image
    signed: bool


def stable_uuid(label: str, purpose: str) -> uuid.UUID:
    return uuid.uuid5(uuid.NAMESPACE_URL, f"particleos:ext:{label}:{purpose}")


def make_filesystem(
    tools: ToolsTree, usr: Path, out: Path, *, filesystem: str, compression: str | None,
    label: str,
) -> None:
    """Reproducible read-only image of `usr` (fixed times, fixed UUID, files owned by root,
    as the base's /usr is built; extended attributes such as file capabilities are kept)."""
    if filesystem == "erofs":
        argv = ["mkfs.erofs", "--quiet", "-T", SOURCE_DATE_EPOCH, "--all-root",
                "-U", str(stable_uuid(label, "fs")), *erofs_layout_options(compression),
                str(out), str(usr)]
    else:
        argv = ["mksquashfs", str(usr), str(out), "-noappend", "-all-root", "-quiet",
                "-no-progress", "-mkfs-time", SOURCE_DATE_EPOCH, "-all-time", SOURCE_DATE_EPOCH]
        if compression == "none":
            argv += ["-noI", "-noD", "-noF", "-noX"]
        elif compression:
            argv += ["-comp", compression]
    tools.run(argv, binds=[usr, out.parent], env={"SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH},
              what=f"mkfs of the extension /usr ({filesystem})")


def pack(
    tools: ToolsTree,
    usr: Path,
    out: Path,
    *,
    label: str,
    filesystem: str = "erofs",
    compression: str | None = "lz4hc",
    signer: VeritySigner | None = None,
) -> PackedImage:
    """usr tree -> `out` (GPT image), written atomically. `label` names the partitions
    (`<id>-<name>_<version>`, clipped to what GPT allows) and seeds UUIDs and salt."""
    work = out.parent
    fs_img = work / f".{out.name}.usr"
    hash_img = work / f".{out.name}.verity"
    sig_img = work / f".{out.name}.sig"
    try:
        make_filesystem(tools, usr, fs_img, filesystem=filesystem, compression=compression,
                        label=label)
        size = fs_img.stat().st_size
        if size % BLOCK:  # verity covers whole blocks: pad so that no byte is unprotected
            os.truncate(fs_img, size + BLOCK - size % BLOCK)
        salt = hashlib.sha256(f"particleos-ext-salt:{label}".encode()).digest()
        result = format_verity(fs_img, hash_img, salt=salt, uuid=stable_uuid(label, "verity"))
        root_hash = result.root_hash.hex()
        usr_uuid, verity_uuid = verity_uuids(result.root_hash)
        part_label = label[:36]
        parts: list[Partition] = []
        sig = signer(root_hash) if signer else None
        if sig is not None:
            sig_img.write_bytes(sig)
            parts.append(Partition(
                part_label, PartType.USR_VERITY_SIG,
                UUID(formats.verity_sig_uuid(str(usr_uuid), str(verity_uuid))),
                align_up(len(sig), disk.SECTOR_SIZE), sig_img, attrs=(ATTR_READ_ONLY,),
            ))
        parts += [
            Partition(part_label, PartType.USR, usr_uuid, fs_img.stat().st_size, fs_img,
                      attrs=(ATTR_READ_ONLY,)),
            Partition(part_label, PartType.USR_VERITY, verity_uuid,
                      align_up(hash_img.stat().st_size, disk.SECTOR_SIZE), hash_img,
                      attrs=(ATTR_READ_ONLY,)),
        ]
        disk.write_disk(out, parts, disk_uuid=stable_uuid(label, "disk"))
    finally:
        for p in (fs_img, hash_img, sig_img):
            p.unlink(missing_ok=True)
    return PackedImage(out, root_hash, size, sig is not None)
