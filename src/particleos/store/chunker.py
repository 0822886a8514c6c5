"""Content-defined chunking on the host, with the `fastcdc` package's compiled FastCDC (about
1.4 GiB/s here). `cdc_next_cut` below is the same algorithm in plain Python: the tests hold
the two to the same cuts. Host only: machines read chunk indexes, they never cut."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from fastcdc import fastcdc

from ..formats import ChunkError

# Content-defined chunking: FastCDC as the `fastcdc` package (PyPI, 1.x) cuts, with its gear
# table: a cut depends only on the bytes since the chunk began, so an insertion moves the cuts
# near it and those after it fall back into step at the next common cut. The host cuts with the
# package's compiled chunker (chunks, cut_sizes); cdc_next_cut is the same algorithm in plain
# Python, the reference the tests hold the compiled one to. The parameters travel in every
# chunk index (ChunkIndex.chunker), so a machine never needs them.
CDC_NAME: Final = "fastcdc-2016"
CDC_DEFAULT: Final[dict[str, Any]] = {
    "name": CDC_NAME, "min": 16 << 10, "avg": 64 << 10, "max": 256 << 10,
}
# File system images (usr, extensions): a package added moves block addresses in inodes all
# over the image, and each such change costs the whole chunk around it; smaller chunks cut
# the v1 -> v1 + htop delta of the usr image from 7.0 to 2.7 MiB (README, *The chunk store*).
CDC_FILESYSTEM: Final[dict[str, Any]] = {
    "name": CDC_NAME, "min": 4 << 10, "avg": 16 << 10, "max": 64 << 10,
}
_GEAR_HEX: Final = (
    "5c95c078224089892d48a21412842087530f8afb474536b92963b4f144cb738b4ea7403d4d606b6e074ec5d3"
    "3af39d18726003ca37a62a7451a2f58e7506358e5d4ab1284d4ae17b41e85924470c36f74741cbe101bb7f30"
    "617c1de32b0c3a1f50c48f7321a82d376095ace0419167a03caf49b040cea62d66bc1c66545e1dad2bfa77cd"
    "6e85da245fb0bdc5652cfc293a0ae1ab2837e0f36387b70e131760124362c2bb66d8f4b137fce8342c9cd386"
    "21144296627268a8650df5372805d5793b21ebbd7357ed343f58b5837150ddca7362225e620a60702c5ef529"
    "7b522466768b78c04b54e51e75fa07e506a35fc630b710241c8626e1296ad57828d7be2e1490a05a7cee43bd"
    "698b56e309dc01264ed6df6e02c1bfc72a59ad5329c0e4347d6c5278507940a75ef6ba9368b6af1e46537276"
    "611bc766155c587d301ba8472cc9dda70a438e2c0a69d514744c72d34f326b9b7ef342864a0ef8a76ae06ebe"
    "669c537212402dcb5feae99d76c7f4a76abdb79c0dfaa03820e2282c730ed48b069dac2f168ecf3e2610e61f"
    "2c512c8e15fb8c065e62bc76695551350adb864c4268f914349ab3aa20edfdb25172798137b4b3d85dd17522"
    "6b2cbfe45c47cf9f30fa1ccd23dedb5613d1f50a64eddee70820b0f746e073081e2d1dfd17b06c32250036d8"
    "284dbf3468292ee0362ec87c087cb1eb76b46720104130db71966387482dc43f2388ef25524144e144bd834e"
    "448e7da33fa6eaf93cda215c3a500cf3395cb4325195129f43945f8751862ca456ea8ff1201034dc4d328ff5"
    "7d73a9096234d37964cfbf9c36f6589a0a2ce98a5fe4d97103bc15c544021d3316c1932b375036141acaf69d"
    "3f03b77949e61a031f52d7ea1c6ddd5c062218ce07e7a11a1905757a7ce00a5349f44f294bcc70b539feea55"
    "5242cee83ce56b8500b8167246beeccc3ca0ad562396cee878547f406b08089b66a56751781e7e461e2cf856"
    "3bc13591494a4202520494d72d87459a757555b642284cc11f47850775c95dff35ff8dd74e4757ed2e11f88c"
    "5e1b5048420e6699226b06954d1679b45a22646f161d1131125c68d91313e32e4aa8572421dc7ec14ffa29fe"
    "729683821ca8eef33f3b1c2839c2fb6c6d76493f7a22a62e789b1c2a16e0cb537deceeeb0dc7e1c65c75bf3d"
    "52218333106de4d67dc6442265590ff42c02ec3064a9ac6759cab2e94a21d2f30f616e5723b54ee802730aaa"
    "2f3c634d7117fc6c01ac6f055a9ed20c158c4e2a42b699f00c7c14b302bd964115ad56fc1c722f607da1af91"
    "23e0dbcb0e93e12b64b2791d440d2476588ea8dd4665a6587446c4181877a7745626407e7f63bd4632d2dbd8"
    "3c790f4a772b72396f8b2826677ff6090dc82c1123ffe3542eac53a616139e090afd0dbc2a4d423756a368c7"
    "234325e42dce918732e8ea7e"
)
CDC_GEAR: Final = tuple(int(_GEAR_HEX[i : i + 8], 16) for i in range(0, 2048, 8))


def cdc_masks(params: dict[str, Any]) -> tuple[int, int, int]:
    """(normalisation point, strict mask, loose mask) as fastcdc derives them."""
    lo, avg, hi = int(params["min"]), int(params["avg"]), int(params["max"])
    offset = min(lo + (lo + 1) // 2, avg)
    center = min(avg - offset, hi)
    bits = round(math.log2(avg))
    return center, (1 << (bits + 1)) - 1, (1 << (bits - 1)) - 1


def check_cdc_params(params: dict[str, Any]) -> None:
    """Parameters this code can cut with (raises ChunkError otherwise)."""
    try:
        lo, avg, hi = int(params["min"]), int(params["avg"]), int(params["max"])
        name = params["name"]
    except (KeyError, TypeError, ValueError) as e:
        raise ChunkError(f"chunker parameters {params!r}: {e}") from None
    if name != CDC_NAME:
        raise ChunkError(f"unknown chunker {name!r}; this side has {CDC_NAME}")
    if not (64 <= lo < avg < hi) or avg < 256 or hi < 1024:
        raise ChunkError(f"chunker parameters {params!r}: need 64 <= min < avg < max")


def cdc_next_cut(data: bytes | memoryview, start: int, params: dict[str, Any]) -> int:
    """Reference chunker (plain Python, ~5-10 MiB/s): the end of the chunk that begins at
    `start`, exactly as fastcdc's `cdc_offset` finds it."""
    center, strict, loose = cdc_masks(params)
    size = min(len(data) - start, int(params["max"]))
    gear = CDC_GEAR
    pattern = 0
    i = min(int(params["min"]), size)
    barrier = min(center, size)
    while i < barrier:
        pattern = (pattern >> 1) + gear[data[start + i]]
        if not pattern & strict:
            return start + i + 1
        i += 1
    while i < size:
        pattern = (pattern >> 1) + gear[data[start + i]]
        if not pattern & loose:
            return start + i + 1
        i += 1
    return start + i


def cdc_cuts(data: bytes | memoryview, params: dict[str, Any] | None = None) -> list[int]:
    """Chunk lengths of `data` by the reference chunker."""
    params = params or CDC_DEFAULT
    sizes, start = [], 0
    while start < len(data):
        end = cdc_next_cut(data, start, params)
        sizes.append(end - start)
        start = end
    return sizes


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
