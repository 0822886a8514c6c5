"""Read the GPT of the running machine's disk, and find which partitions back /usr.

Read straight from the disk rather than from udev: right after systemd-sysupdate relabels a
slot, udev's database (and so lsblk) can still show the old label for a while.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# Discoverable Partitions Specification type GUIDs (x86-64) that A/B updates deal with.
# UUIDs are kept as lowercase strings: python3-minimal has no uuid module.
USR = "8484680c-9521-48c6-9c11-b0720656f69e"
USR_VERITY = "77ff5f63-e7b6-4633-acf4-1565b864c0e6"
USR_VERITY_SIG = "e7bb33fb-06cf-4e81-8273-e543b413e2e2"
EMPTY_LABEL = "_empty"
SYS_BLOCK = Path("/sys/class/block")


class GptError(Exception):
    """The disk has no readable GPT."""


@dataclass(frozen=True)
class Partition:
    number: int  # 1-based, as in /dev/vdaN
    type: str
    uuid: str
    label: str
    first_lba: int
    last_lba: int
    attrs: int


def parse_gpt(read: Callable[[int, int], bytes], sector_size: int = 512) -> list[Partition]:
    """Parse a GPT through `read(offset, size) -> bytes` (a callable, so that tests can read
    an image file and the machine its disk)."""
    header = read(sector_size, 92)
    if header[:8] != b"EFI PART":
        raise GptError("no GPT signature at LBA 1")
    entries_lba, count, entry_size = struct.unpack_from("<QII", header, 72)
    if not 128 <= entry_size <= 4096 or count > 1024:
        raise GptError(f"implausible GPT header (entries: {count} x {entry_size} bytes)")
    table = read(entries_lba * sector_size, count * entry_size)
    parts = []
    for i in range(count):
        raw = table[i * entry_size : (i + 1) * entry_size]
        if not any(raw[:16]):
            continue
        first, last, attrs = struct.unpack_from("<QQQ", raw, 32)
        name = bytes(raw[56:128]).decode("utf-16-le", errors="replace").split("\0", 1)[0]
        parts.append(Partition(i + 1, guid(raw[:16]), guid(raw[16:32]), name, first, last,
                               attrs))
    return parts


def guid(raw: bytes) -> str:
    """A GUID as GPT stores it (first three fields little-endian) in its usual text form."""
    a, b, c = struct.unpack_from("<IHH", raw)
    return f"{a:08x}-{b:04x}-{c:04x}-{raw[8:10].hex()}-{raw[10:16].hex()}"


def dashed(hex32: str) -> str:
    """32 hex digits (half a root hash) as a UUID string, as usrhash= names partitions."""
    h = hex32.lower()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def read_disk_gpt(disk: str) -> list[Partition]:
    """The partition table of /dev/DISK as it is on the disk now."""
    sector = int((SYS_BLOCK / disk / "queue/logical_block_size").read_text())
    fd = os.open(f"/dev/{disk}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return parse_gpt(lambda off, size: os.pread(fd, size, off), sector)
    finally:
        os.close(fd)


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
