"""dm-verity hash trees computed in-process, byte-identical to `veritysetup format`.

Why not just run veritysetup: the salt and the superblock UUID must be inputs for reproducible
images, and computing the tree ourselves needs no root, no loop devices, and no parsing of
veritysetup's human-readable output. tests/unit/test_verity.py checks every byte against
veritysetup, so the two cannot drift apart silently.

On-disk format (verity format 1, sha256; see cryptsetup's lib/verity/verity_hash.c):

* each data block is hashed as sha256(salt || block);
* a hash block holds block_size/32 digests, zero-padded at the end; a level's digests are
  packed into as many hash blocks as needed, and the next level hashes those blocks the same
  salted way, until one block remains; its salted hash is the root hash;
* a single data block gives no tree at all: the root hash is that block's salted hash;
* the hash device stores the levels top level first; with a superblock (veritysetup's
  default, and what systemd-repart writes and systemd-veritysetup expects unless told
  `superblock=false`) a 512-byte superblock comes first, padded to a whole hash block.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Final
from uuid import UUID

from . import formats
from .ui import ui

# Default salt: fixed, so two builds of the same inputs give the same root hash. Callers that
# want per-image salts (as systemd-repart derives them from its seed) pass their own.
DEFAULT_SALT: Final = hashlib.sha256(b"particleos").digest()

MAX_SALT_SIZE: Final = 256  # the superblock's salt field; veritysetup refuses more
SUPERBLOCK_SIZE: Final = 512
_DIGEST_SIZE: Final = 32  # sha256; a power of two, so format 1 stores digests unpadded
_READ_CHUNK: Final = 1 << 20  # 1 MiB stays in L2 while it is hashed: measured fastest

# struct verity_sb from cryptsetup's lib/verity/verity.c, little-endian, 512 bytes:
# signature, version, hash_type, uuid, algorithm, data/hash block size, data blocks,
# salt size, pad, salt, pad.
_SUPERBLOCK: Final = struct.Struct("<8sII16s32sIIQH6x256s168x")
assert _SUPERBLOCK.size == SUPERBLOCK_SIZE


@dataclass(frozen=True)
class VerityResult:
    """What the partition table, the kernel command line and the signature need from a tree."""

    root_hash: bytes
    salt: bytes
    data_size: int  # bytes of data covered by the tree (always whole blocks)
    hash_size: int  # bytes written to the hash file, superblock included
    data_block_size: int = 4096
    hash_block_size: int = 4096
    superblock_uuid: UUID | None = None  # None when written without a superblock
    algorithm: ClassVar[str] = "sha256"

    @property
    def root_hash_hex(self) -> str:
        """The form usrhash=/roothash= and `veritysetup open` take."""
        return self.root_hash.hex()

    @property
    def data_blocks(self) -> int:
        return self.data_size // self.data_block_size


def format_verity(
    data: Path,
    hash_out: Path,
    salt: bytes | None = None,
    block_size: int = 4096,
    *,
    superblock: bool = True,
    uuid: UUID | None = None,
) -> VerityResult:
    """Write the dm-verity hash tree of `data` to `hash_out`, as `veritysetup format` would.

    `salt` defaults to DEFAULT_SALT (b"" means no salt). With `superblock` (the default, which
    systemd-veritysetup and systemd-repart use) the superblock's UUID is `uuid`, or if that is
    None one derived from the root hash, so the output is reproducible either way.

    The data size must be a whole number of blocks: veritysetup silently leaves a trailing
    partial block out of the tree (unprotected), so we refuse instead. The data is streamed in
    1 MiB reads; memory use is about 1/64 of the data size (the first hash level, held twice).
    """
    if salt is None:
        salt = DEFAULT_SALT
    _check_parameters(salt, block_size)
    start = time.monotonic()
    with open(data, "rb", buffering=0) as f:
        size = f.seek(0, os.SEEK_END)  # also works for block devices, unlike st_size
        f.seek(0)
        if size == 0 or size % block_size:
            raise ValueError(
                f"{data}: size {size} is not a positive multiple of the verity block size "
                f"{block_size}; pad the image first (veritysetup would leave the tail unprotected)"
            )
        salted = hashlib.sha256(salt)
        digests = _hash_stream(f, salted.copy, size, block_size, data)

    # Build the levels bottom-up; each one is the previous level's digests in whole blocks.
    levels: list[bytes] = []
    while len(digests) > _DIGEST_SIZE:
        level = digests + bytes(-len(digests) % block_size)
        levels.append(level)
        digests = _hash_blocks(salted.copy, memoryview(level), block_size)
    root_hash = digests

    sb_uuid = None
    if superblock:
        sb_uuid = uuid if uuid is not None else _derived_superblock_uuid(root_hash)
        header = _SUPERBLOCK.pack(
            b"verity", 1, 1, sb_uuid.bytes, b"sha256", block_size, block_size,
            size // block_size, len(salt), salt
        )  # fmt: skip
        levels.append(header + bytes(-len(header) % block_size))
    with open(hash_out, "wb") as out:
        for part in reversed(levels):  # superblock, then the top level down to level 0
            out.write(part)
    hash_size = sum(len(part) for part in levels)

    elapsed = time.monotonic() - start
    ui.debug(f"  (verity hash tree of {data.name}: {size >> 20} MiB in {elapsed:.1f} s)")
    return VerityResult(
        root_hash=root_hash,
        salt=salt,
        data_size=size,
        hash_size=hash_size,
        data_block_size=block_size,
        hash_block_size=block_size,
        superblock_uuid=sb_uuid,
    )


def verity_uuids(root_hash: bytes) -> tuple[UUID, UUID]:
    """(data partition UUID, hash partition UUID) that systemd finds from usrhash=/roothash=.

    Exactly what systemd-repart assigns and systemd-veritysetup-generator looks up under
    /dev/disk/by-partuuid/: the first and the last 128 bits of the root hash, bytes in order,
    with no UUID version/variant bits forced. Give the partitioning tool str(uuid): GPT stores
    the mixed-endian encoding of that string, and udev shows the string again.
    """
    data, hashes = formats.verity_partition_uuids(root_hash)
    return UUID(data), UUID(hashes)


def verity_sig_json(root_hash_hex: str, signature_der: bytes, cert_der: bytes) -> bytes:
    """Contents of a usr-verity-sig/root-verity-sig partition, as systemd-repart writes them.

    Compact JSON with systemd-repart's key order (rootHash, certificateFingerprint,
    signature), NUL-padded to a multiple of 4096 bytes with at least one NUL. The signature
    is a detached DER PKCS#7 over the root hash's hex text; the fingerprint is the sha256 of
    the DER certificate, as the kernel keyring and systemd-dissect compare it.
    """
    root_hash = bytes.fromhex(root_hash_hex)  # rejects non-hex; normalizes case
    for name, blob in (("signature", signature_der), ("certificate", cert_der)):
        if not blob.startswith(b"\x30"):  # every DER structure here is a SEQUENCE
            raise ValueError(f"{name} must be DER (PEM or empty input given?)")
    text = json.dumps(
        {
            "rootHash": root_hash.hex(),
            "certificateFingerprint": hashlib.sha256(cert_der).hexdigest(),
            "signature": base64.b64encode(signature_der).decode("ascii"),
        },
        separators=(",", ":"),
    ).encode("ascii")
    return text + bytes(4096 - len(text) % 4096)


def _check_parameters(salt: bytes, block_size: int) -> None:
    if len(salt) > MAX_SALT_SIZE:
        raise ValueError(f"verity salt is {len(salt)} bytes; at most {MAX_SALT_SIZE} fit")
    if not 512 <= block_size <= 512 * 1024 or block_size & (block_size - 1):
        raise ValueError(f"verity block size {block_size} is not a power of two in 512..512K")


def _derived_superblock_uuid(root_hash: bytes) -> UUID:
    """A reproducible superblock UUID: the superblock is not covered by the root hash, so it can
    be derived from it. Domain-separated so it never equals either partition UUID."""
    digest = hashlib.sha256(b"particleos verity superblock uuid\0" + root_hash).digest()
    return UUID(bytes=digest[:16], version=4)


def _hash_stream(
    f: io.RawIOBase, copy: Callable[[], hashlib._Hash], size: int, block_size: int, path: Path
) -> bytes:
    """Salted digests of all `size` bytes of `f`, read in large chunks into one reused buffer."""
    chunk = max(block_size, _READ_CHUNK // block_size * block_size)
    buf = memoryview(bytearray(chunk))
    parts: list[bytes] = []
    remaining = size
    while remaining:
        want = min(chunk, remaining)
        got = 0
        while got < want:  # raw reads may come back short
            n = f.readinto(buf[got:want])
            if not n:
                raise OSError(f"{path}: file shrank while its verity hash tree was computed")
            got += n
        parts.append(_hash_blocks(copy, buf[:want], block_size))
        remaining -= want
    return b"".join(parts)


def _hash_blocks(copy: Callable[[], hashlib._Hash], view: memoryview, block_size: int) -> bytes:
    """sha256(salt || block) for each block of `view`, concatenated.

    `copy` clones a hash object already fed the salt: cheaper than hashing the salt per block.
    This loop is the hot path; it runs at about the speed of veritysetup itself.
    """
    out: list[bytes] = []
    append = out.append
    for off in range(0, len(view), block_size):
        h = copy()
        h.update(view[off : off + block_size])
        append(h.digest())
    return b"".join(out)
