"""Write a whole GPT disk image from a partition list: sfdisk for the table, then the contents.

sfdisk instead of systemd-repart: one pass over a sparse file takes seconds, repart's two
passes ~30 s (DESIGN.md section 8), and every field (UUIDs, labels, offsets) is ours to fix.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any
from uuid import UUID

from .. import formats, runner
from ..cache import atomic_file
from ..errors import ParticleError
from .layout import GPT_NAME_MAX, Partition, disk_size, file_size, partition_offsets
from .sizes import ALIGNMENT, SECTOR_SIZE, MiB, align_up, format_size

_CHUNK = MiB
_ZERO_CHUNK = bytes(_CHUNK)
# copy_file_range failures that mean "not supported here", not "broken": fall back to read/write.
_NO_COPY_RANGE = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}


def write_disk(
    path: Path, partitions: list[Partition], disk_uuid: UUID, sector_size: int = SECTOR_SIZE,
    free_space: int = 0,
) -> None:
    """Create the disk image at `path` atomically: a failure leaves an existing file untouched.
    `free_space` bytes stay unpartitioned after the last partition (where systemd-repart
    creates an encrypted root at the first boot).

    Only 512-byte sectors: sfdisk takes the sector size from the device, and an image file
    always has 512 (its `sector-size:` header is informative only). OVMF wants 512 anyway.
    """
    if sector_size != SECTOR_SIZE:
        raise ParticleError(
            f"sector size {sector_size} is not supported: disk images use {SECTOR_SIZE}-byte "
            "sectors (sfdisk cannot write another size to an image file)"
        )
    for number, part in enumerate(partitions, 1):
        _validate(number, part)
    offsets = partition_offsets(partitions)
    script = _script(partitions, offsets, disk_uuid)
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            # sparse: unwritten ranges cost no space
            f.truncate(disk_size(partitions) + align_up(free_space, ALIGNMENT))
        runner.run(
            [
                "sfdisk",
                "--quiet",
                "--no-reread",
                "--no-tell-kernel",
                "--wipe",
                "always",
                "--wipe-partitions",
                "never",
                tmp,
            ],
            input=script.encode(),
            what="sfdisk (writing the partition table)",
        )
        _check_table(tmp, partitions, offsets)
        fd = os.open(tmp, os.O_WRONLY)
        try:
            for part, offset in zip(partitions, offsets, strict=True):
                if part.content is not None:
                    copy_into(fd, part.content, offset)
        finally:
            os.close(fd)


def read_table(path: Path) -> list[dict[str, Any]]:
    """The partitions in the shape `sfdisk --json` reports them (start/size in 512-byte
    sectors, type/uuid upper-case, attrs like "GUID:59"), read by the one GPT reader in
    `particleos.formats`."""
    table = []
    for p in formats.read_gpt(path):
        entry: dict[str, Any] = {
            "node": f"{path}{p.number}", "start": p.first_lba,
            "size": p.last_lba - p.first_lba + 1, "type": p.type.upper(),
            "uuid": p.uuid.upper(), "name": p.label,
        }
        bits = [b for b in range(48, 64) if p.attrs >> b & 1]
        if bits:
            entry["attrs"] = "GUID:" + ",".join(str(b) for b in sorted(bits, reverse=True))
        table.append(entry)
    return table


def copy_into(dst_fd: int, src: Path, offset: int) -> None:
    """Copy `src` to `offset` in `dst_fd`, skipping the source's holes so a sparse source stays
    sparse (the destination is a fresh sparse file, so skipped ranges already read as zero)."""
    with open(src, "rb") as f:
        src_fd = f.fileno()
        size = os.fstat(src_fd).st_size
        for start, end in _data_extents(src_fd, size):
            _copy_range(src, src_fd, dst_fd, (start, end), offset)


def _validate(number: int, part: Partition) -> None:
    where = f"partition {number} ({part.label!r})"
    if part.size <= 0 or part.size % SECTOR_SIZE:
        raise ParticleError(
            f"{where}: size {part.size} is not a positive multiple of {SECTOR_SIZE} bytes"
        )
    if len(part.label.encode("utf-16-le")) // 2 > GPT_NAME_MAX:
        raise ParticleError(f"{where}: the label is longer than {GPT_NAME_MAX} characters")
    if any(c in part.label for c in '"\\') or not part.label.isprintable():
        raise ParticleError(
            f"{where}: the label may not contain quotes, backslashes or control characters"
        )
    if part.content is not None and (have := file_size(part.content)) > part.size:
        raise ParticleError(
            f"{where}: {part.content} ({format_size(have)}) does not fit the "
            f"partition ({format_size(part.size)})"
        )


def _script(partitions: list[Partition], offsets: list[int], disk_uuid: UUID) -> str:
    lines = [
        "label: gpt",
        f"label-id: {disk_uuid}",
        f"sector-size: {SECTOR_SIZE}",
        f"first-lba: {ALIGNMENT // SECTOR_SIZE}",
    ]
    for part, offset in zip(partitions, offsets, strict=True):
        fields = [
            f"start={offset // SECTOR_SIZE}",
            f"size={part.size // SECTOR_SIZE}",
            f"type={part.type_uuid}",
            f"uuid={part.uuid}",
            f'name="{part.label}"',
        ]
        if part.attrs:
            bits = ",".join(str(b) for b in sorted(part.attrs, reverse=True))
            fields.append(f'attrs="GUID:{bits}"')
        lines.append(", ".join(fields))
    return "\n".join(lines) + "\n"


def _check_table(path: Path, partitions: list[Partition], offsets: list[int]) -> None:
    """Fail loudly if sfdisk placed anything other than where the layout says: contents are
    copied to the planned offsets, so a silent realignment would corrupt the image."""
    table = read_table(path)
    got = [(p["start"] * SECTOR_SIZE, p["size"] * SECTOR_SIZE) for p in table]
    want = [(o, p.size) for p, o in zip(partitions, offsets, strict=True)]
    if got != want:
        raise ParticleError(
            f"sfdisk did not create the planned partitions: got (offset, size) "
            f"{got}, expected {want}"
        )


def _data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """(start, end) ranges of `fd` that hold data; the whole file if holes can't be queried."""
    extents, pos = [], 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # only a hole is left
                    break
                raise
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            extents.append((start, end))
            pos = end
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
        return [(0, size)] if size else []
    return extents


def _copy_range(src: Path, src_fd: int, dst_fd: int, extent: tuple[int, int], offset: int) -> None:
    pos, end = extent
    try:
        while pos < end:
            n = os.copy_file_range(src_fd, dst_fd, end - pos, pos, offset + pos)
            if n == 0:  # unexpected EOF (file shrank); let the slow path report it
                break
            pos += n
    except OSError as e:
        if e.errno not in _NO_COPY_RANGE:
            raise
    while pos < end:
        chunk = os.pread(src_fd, min(_CHUNK, end - pos), pos)
        if not chunk:
            raise ParticleError(f"{src} changed while it was copied (ended at byte {pos})")
        if chunk != _ZERO_CHUNK[: len(chunk)]:
            view = memoryview(chunk)
            while view:
                written = os.pwrite(dst_fd, view, offset + pos + len(chunk) - len(view))
                view = view[written:]
        pos += len(chunk)
