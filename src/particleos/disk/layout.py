"""The partition table of an `ab-usr` image (DESIGN.md section 4) as plain data.

Kept free of I/O apart from reading file sizes, so the layout can be checked (and shown)
before anything is written.
"""

from __future__ import annotations

import uuid as uuidlib
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from uuid import UUID

from .. import formats
from ..errors import ParticleError
from .sizes import ALIGNMENT, SECTOR_SIZE, KiB, MiB, align_up, format_size


class PartType:
    """Discoverable Partitions Specification type GUIDs (x86-64 where it matters), as UUIDs;
    the values are defined once, in `particleos.formats`.

    systemd-gpt-auto-generator, systemd-repart and systemd-sysupdate find partitions by these.
    """

    ESP: Final = UUID(formats.ESP)
    XBOOTLDR: Final = UUID(formats.XBOOTLDR)
    USR: Final = UUID(formats.USR)
    USR_VERITY: Final = UUID(formats.USR_VERITY)
    USR_VERITY_SIG: Final = UUID(formats.USR_VERITY_SIG)
    ROOT: Final = UUID(formats.ROOT)
    ROOT_VERITY: Final = UUID(formats.ROOT_VERITY)
    ROOT_VERITY_SIG: Final = UUID(formats.ROOT_VERITY_SIG)
    HOME: Final = UUID(formats.HOME)
    SWAP: Final = UUID(formats.SWAP)
    VAR: Final = UUID(formats.VAR)


ATTR_NO_AUTO: Final = formats.ATTR_NO_AUTO
ATTR_READ_ONLY: Final = formats.ATTR_READ_ONLY
ATTR_GROW_FS: Final = formats.ATTR_GROW_FS

# Room for the verity signature JSON (a PKCS#7 signature plus a hex root hash is ~2-3 KiB);
# fixed so that slot B can take any later signature.
VERITY_SIG_SIZE: Final = 16 * KiB
EMPTY_LABEL: Final = formats.EMPTY_LABEL
GPT_NAME_MAX: Final = 36  # UTF-16 code units in a GPT partition entry
NAMESPACE: Final = UUID(formats.NAMESPACE)

_VERITY_BLOCK = 4096
_DIGEST_SIZE = 32  # sha256


@dataclass(frozen=True)
class Partition:
    """One GPT entry. `content` (if any) is copied to the partition's start; the rest stays zero."""

    label: str
    type_uuid: UUID
    uuid: UUID
    size: int
    content: Path | None = None
    attrs: tuple[int, ...] = ()


def partition_uuid_for(image_id: str, role: str) -> UUID:
    """A stable partition UUID for partitions whose UUID no content hash determines."""
    return uuidlib.uuid5(NAMESPACE, f"{image_id}/{role}")


def verity_size(data_size: int) -> int:
    """Partition size that holds the dm-verity hash tree (plus superblock) of `data_size` bytes.

    Sized for a full slot rather than the current image, so later, larger updates still fit.
    """
    blocks = max(1, -(-data_size // _VERITY_BLOCK))
    per_block = _VERITY_BLOCK // _DIGEST_SIZE
    total = 0
    while True:
        blocks = -(-blocks // per_block)
        total += blocks
        if blocks == 1:
            break
    return align_up(total * _VERITY_BLOCK + _VERITY_BLOCK, MiB)


def partition_offsets(partitions: list[Partition]) -> list[int]:
    """Byte offset of each partition: packed in order, each start on a 1 MiB boundary."""
    offsets, pos = [], ALIGNMENT
    for part in partitions:
        offsets.append(pos)
        pos = align_up(pos + part.size, ALIGNMENT)
    return offsets


def disk_size(partitions: list[Partition]) -> int:
    """Whole-disk size: the last partition's (aligned) end plus 1 MiB for the backup GPT."""
    if not partitions:
        return 2 * ALIGNMENT
    end = partition_offsets(partitions)[-1] + partitions[-1].size
    return align_up(end, ALIGNMENT) + ALIGNMENT


def ab_usr_layout(
    *,
    image_id: str,
    version: str,
    esp: Path,
    usr: Path,
    usr_verity: Path,
    usr_verity_sig: Path | None,
    usr_uuid: UUID,
    verity_uuid: UUID,
    usr_slot_size: int,
    root: Path | None,
    root_size: int,
    root_partition: bool = True,
) -> list[Partition]:
    """ESP, usr slot A (filled), usr slot B (`_empty`, same sizes), root with grow-fs.

    Slot B gets the same sizes as A because systemd-sysupdate writes updates into it in place.
    Without `root_partition` (an encrypted root, made by systemd-repart at the first boot)
    the list ends with slot B and the caller leaves `root_size` free after it.
    """
    label = f"{image_id}_{version}"  # at most GPT_NAME_MAX characters: spec.checks
    usr_bytes = file_size(usr)
    if usr_bytes > usr_slot_size:
        raise ParticleError(
            f"the usr image ({format_size(usr_bytes)}) does not fit usr_slot_size "
            f"({format_size(usr_slot_size)}): raise `image.usr_slot_size` to at least "
            f"{format_size(align_up(usr_bytes, MiB))}, with headroom for later updates"
        )
    vsize = verity_size(usr_slot_size)
    _check_fits(usr_verity, vsize, "usr verity hash tree")
    if root is not None:
        _check_fits(root, root_size, "root file system image", "image.root_size")
    parts = [
        Partition(
            "esp",
            PartType.ESP,
            partition_uuid_for(image_id, "esp"),
            align_up(file_size(esp), SECTOR_SIZE),
            esp,
        ),
    ]
    if usr_verity_sig is not None:
        _check_fits(usr_verity_sig, VERITY_SIG_SIZE, "usr verity signature")
        sig_uuid = UUID(formats.verity_sig_uuid(str(usr_uuid), str(verity_uuid)))
        parts.append(
            Partition(label, PartType.USR_VERITY_SIG, sig_uuid, VERITY_SIG_SIZE, usr_verity_sig)
        )
    parts += [
        Partition(label, PartType.USR_VERITY, verity_uuid, vsize, usr_verity),
        Partition(label, PartType.USR, usr_uuid, usr_slot_size, usr),
    ]
    if usr_verity_sig is not None:
        parts.append(
            Partition(
                EMPTY_LABEL,
                PartType.USR_VERITY_SIG,
                partition_uuid_for(image_id, "usr-verity-sig-b"),
                VERITY_SIG_SIZE,
            )
        )
    parts += [
        Partition(
            EMPTY_LABEL, PartType.USR_VERITY, partition_uuid_for(image_id, "usr-verity-b"), vsize
        ),
        Partition(EMPTY_LABEL, PartType.USR, partition_uuid_for(image_id, "usr-b"), usr_slot_size),
    ]
    if not root_partition:
        return parts
    parts += [
        Partition(
            "root",
            PartType.ROOT,
            partition_uuid_for(image_id, "root"),
            root_size,
            root,
            attrs=(ATTR_GROW_FS,),
        ),
    ]
    return parts


def file_size(path: Path) -> int:
    """Size of a content file; a missing one is a ParticleError naming it, not a traceback."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        raise ParticleError(f"partition content {path} does not exist") from None


def _check_fits(path: Path, size: int, what: str, setting: str | None = None) -> None:
    have = file_size(path)
    if have > size:
        hint = f": raise `{setting}`" if setting else ""
        raise ParticleError(
            f"the {what} {path} ({format_size(have)}) does not fit its partition "
            f"({format_size(size)}){hint}"
        )
