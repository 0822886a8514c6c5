"""The disk layer: partition layout, GPT disk images, and the ESP/root file systems in them."""

from __future__ import annotations

from .fs import DEFAULT_EPOCH, FAT32_MIN_SIZE, make_esp, make_ext4, source_date_epoch
from .gpt import copy_into, read_table, write_disk
from .layout import (
    ATTR_GROW_FS,
    ATTR_NO_AUTO,
    ATTR_READ_ONLY,
    EMPTY_LABEL,
    VERITY_SIG_SIZE,
    Partition,
    PartType,
    ab_usr_layout,
    disk_size,
    partition_offsets,
    partition_uuid_for,
    verity_size,
)
from .sizes import ALIGNMENT, SECTOR_SIZE, GiB, KiB, MiB, align_up, format_size

__all__ = [
    "ALIGNMENT",
    "ATTR_GROW_FS",
    "ATTR_NO_AUTO",
    "ATTR_READ_ONLY",
    "DEFAULT_EPOCH",
    "EMPTY_LABEL",
    "FAT32_MIN_SIZE",
    "SECTOR_SIZE",
    "VERITY_SIG_SIZE",
    "GiB",
    "KiB",
    "MiB",
    "PartType",
    "Partition",
    "ab_usr_layout",
    "align_up",
    "copy_into",
    "disk_size",
    "format_size",
    "make_esp",
    "make_ext4",
    "partition_offsets",
    "partition_uuid_for",
    "read_table",
    "source_date_epoch",
    "verity_size",
    "write_disk",
]
