"""Content-defined chunking on the host, with the `fastcdc` package's compiled FastCDC (about
1.4 GiB/s here). `particleos.formats.cdc_next_cut` is the same algorithm in plain Python: the
tests hold the two to the same cuts."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastcdc import fastcdc

from ..formats import CDC_DEFAULT, check_cdc_params


@dataclass(frozen=True)
class Chunk:
    offset: int
    data: bytes
    digest: str  # sha256 hex of data


def chunks(source: Path | bytes, params: dict[str, Any] | None = None) -> Iterator[Chunk]:
    """The chunks of a file (memory-mapped by fastcdc) or of bytes, in order."""
    params = params or CDC_DEFAULT
    check_cdc_params(params)
    if isinstance(source, Path):
        if source.stat().st_size == 0:  # fastcdc cannot map an empty file
            return
        src: str | bytes = str(source)
    else:
        if not source:
            return
        src = source
    for c in fastcdc(src, int(params["min"]), int(params["avg"]), int(params["max"]),
                     fat=True, hf=hashlib.sha256):
        yield Chunk(c.offset, bytes(c.data), c.hash)


def cut_sizes(source: Path | bytes, params: dict[str, Any] | None = None) -> list[int]:
    """Chunk lengths only (for tests and measurements)."""
    params = params or CDC_DEFAULT
    check_cdc_params(params)
    data = source.read_bytes() if isinstance(source, Path) else source
    if not data:
        return []
    return [c.length for c in fastcdc(data, int(params["min"]), int(params["avg"]),
                                      int(params["max"]))]
