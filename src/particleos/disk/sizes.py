"""Byte-size arithmetic shared by the disk layer; every size in its API is in bytes."""

from __future__ import annotations

from typing import Final

KiB: Final = 1 << 10
MiB: Final = 1 << 20
GiB: Final = 1 << 30

# Partitions start on 1 MiB boundaries: what every partitioning tool does, and what keeps
# them aligned for any physical sector or erase-block size the image may be written to.
ALIGNMENT: Final = MiB
SECTOR_SIZE: Final = 512


def align_up(n: int, alignment: int) -> int:
    """Smallest multiple of `alignment` that is >= n."""
    if alignment <= 0:
        raise ValueError(f"alignment must be positive, got {alignment}")
    return -(-n // alignment) * alignment


def format_size(n: int) -> str:
    """A short human-readable size for messages, e.g. "8 MiB" or "1.5 GiB" (binary units)."""
    for unit, factor in (("TiB", 1 << 40), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= factor:
            value = n / factor
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{n} B"
