"""File system layout for small deltas (issue 11, item 4)."""

from __future__ import annotations


def erofs_layout_options(compression: str | None) -> list[str]:
    """mkfs.erofs options that keep unchanged files' bytes unchanged from one version to the
    next, so that the chunk store (delta updates) finds them again. Measured on v1 -> v1 +
    htop (benchmarks/delta.py, README): inline tail data packs the ends of files into the
    inode blocks, whose block addresses shift with every insertion; without it, and with
    physical clusters of up to 64 KiB (which win back the size that costs: 101.8 MiB
    either way), the new chunks of the usr image fell from 7.5 to 2.7 MiB."""
    options = ["-Enoinline_data"]
    if compression and compression != "none":
        options += [f"-z{compression}", "-C65536"]
    return options
