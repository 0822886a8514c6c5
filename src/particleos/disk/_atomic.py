"""All-or-nothing output files: an interrupted or failed build never leaves a half-written image."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


def temp_path_for(path: Path) -> Path:
    """The temporary name used while `path` is written: hidden, in the same directory (so the
    final rename is atomic) and fixed (so a leftover of a killed run is reused, not piled up)."""
    return path.with_name(f".{path.name}.tmp")


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success fsync it and rename it onto `path`.

    On any exception the temporary file is removed and an existing `path` is left untouched.
    """
    tmp = temp_path_for(path)
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
