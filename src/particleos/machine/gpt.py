"""Read the GPT of the running machine's disk, and find which partitions back /usr.

Read straight from the disk rather than from udev: right after systemd-sysupdate relabels a
slot, udev's database (and so lsblk) can still show the old label for a while.
"""

from __future__ import annotations

import os
from pathlib import Path

from .. import formats

# The formats (type GUIDs, GPT entries) are defined once, in particleos.formats.
USR = formats.USR
USR_VERITY = formats.USR_VERITY
USR_VERITY_SIG = formats.USR_VERITY_SIG
EMPTY_LABEL = formats.EMPTY_LABEL
SYS_BLOCK = Path("/sys/class/block")
Partition = formats.GptPartition
GptError = formats.GptError
parse_gpt = formats.parse_gpt


def read_disk_gpt(disk: str) -> list[Partition]:
    """The partition table of /dev/DISK as it is on the disk now."""
    sector = int((SYS_BLOCK / disk / "queue/logical_block_size").read_text())
    return formats.read_gpt(f"/dev/{disk}", sector)


def block_of(path: str) -> str:
    """Kernel name of the block device a mounted file system lives on (e.g. dm-0, vda6)."""
    dev = os.stat(path).st_dev
    link = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    return link.resolve().name


def partitions_under(name: str) -> list[tuple[str, int]]:
    """(disk, partition number) of the partitions a block device is made of: a dm-verity
    device has its data and hash partitions as slaves; a partition is itself."""
    node = SYS_BLOCK / name
    slaves = sorted((node / "slaves").iterdir()) if (node / "slaves").is_dir() else []
    result = []
    for part in [s.name for s in slaves] or [name]:
        pnode = SYS_BLOCK / part
        if (pnode / "partition").exists():
            disk = pnode.resolve().parent.name
            result.append((disk, int((pnode / "partition").read_text())))
    return result


def partition_device(disk: str, number: int) -> str:
    """/dev node of partition `number` of `disk` (vda3, nvme0n1p3, ...), found through sysfs."""
    for child in (SYS_BLOCK / disk).resolve().iterdir():
        pfile = child / "partition"
        if pfile.exists() and int(pfile.read_text()) == number:
            return f"/dev/{child.name}"
    raise GptError(f"/dev/{disk} has no partition {number} (the kernel has not seen it yet?)")
