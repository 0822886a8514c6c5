"""Read the sections of a Unified Kernel Image (a PE file): `.cmdline` says which /usr a
version boots (usrhash=), `.osrel` its version, `.uname` its kernel; `.linux` and `.initrd`
are what kexec loads. Only the section table and the sections asked for are read."""

from __future__ import annotations

import struct
from pathlib import Path


class PEError(Exception):
    """Not a PE file, or a truncated one."""


def sections(path: Path) -> dict[str, tuple[int, int]]:
    """Section name -> (file offset, size) of a PE file."""
    with path.open("rb") as f:
        head = f.read(64)
        if len(head) < 64 or head[:2] != b"MZ":
            raise PEError(f"{path}: not a PE file")
        (pe_offset,) = struct.unpack_from("<I", head, 0x3C)
        f.seek(pe_offset)
        coff = f.read(24)
        if len(coff) < 24 or coff[:4] != b"PE\0\0":
            raise PEError(f"{path}: no PE signature")
        count, opt_size = struct.unpack_from("<H12xH", coff, 6)
        f.seek(pe_offset + 24 + opt_size)
        table = f.read(40 * count)
    if len(table) < 40 * count:
        raise PEError(f"{path}: truncated section table")
    result = {}
    for i in range(count):
        raw = table[i * 40 : (i + 1) * 40]
        name = raw[:8].rstrip(b"\0").decode("ascii", errors="replace")
        vsize, _vaddr, rsize, offset = struct.unpack_from("<IIII", raw, 8)
        result[name] = (offset, min(vsize, rsize) if vsize else rsize)
    return result


def read_section(path: Path, name: str) -> bytes | None:
    table = sections(path)
    if name not in table:
        return None
    offset, size = table[name]
    with path.open("rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) < size:
        raise PEError(f"{path}: section {name} is truncated")
    return data


def read_text(path: Path, name: str) -> str | None:
    data = read_section(path, name)
    return None if data is None else data.rstrip(b"\0").decode(errors="replace").strip()


def extract(path: Path, name: str, dest: Path) -> None:
    """Copy one section to a file (kexec needs the kernel and initrd as files)."""
    offset, size = sections(path)[name]
    with path.open("rb") as fin, dest.open("wb") as fout:
        fin.seek(offset)
        left = size
        while left:
            chunk = fin.read(min(left, 1 << 20))
            if not chunk:
                raise PEError(f"{path}: section {name} is truncated")
            fout.write(chunk)
            left -= len(chunk)
