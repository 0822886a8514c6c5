"""Every on-disk format that more than one side reads or writes, defined once: the partition
type GUIDs and the GPT reader, the partition UUID rules of a verity slot, SHA256SUMS, and the
build manifest. The builder, `particle publish`, the extension builder and the machine-side
`particle` all import this module, so a file written by one side is read by the same code on
the other (a mismatch between copies would break updates in the field).

Standard library only, and only what trixie's python3-minimal ships (no uuid, shutil,
tempfile): the build copies this file into every image next to `particleos.machine`.
"""

from __future__ import annotations

import binascii
import hashlib
import json
import math
import os
import re
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

# --- Discoverable Partitions Specification (x86-64) -------------------------------------------

ESP: Final = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"
XBOOTLDR: Final = "bc13c2ff-59e6-4262-a352-b275fd6f7172"
USR: Final = "8484680c-9521-48c6-9c11-b0720656f69e"
USR_VERITY: Final = "77ff5f63-e7b6-4633-acf4-1565b864c0e6"
USR_VERITY_SIG: Final = "e7bb33fb-06cf-4e81-8273-e543b413e2e2"
ROOT: Final = "4f68bce3-e8cd-4db1-96e7-fbcaf984b709"
ROOT_VERITY: Final = "2c7357ed-ebd2-46d9-aec1-23d437ec2bf5"
ROOT_VERITY_SIG: Final = "41092b05-9fc8-4523-994f-2def0408b176"
HOME: Final = "933ac7e1-2eb4-4f13-b844-0e14e2aef915"
SWAP: Final = "0657fd6d-a4ab-43c4-84e5-0933c84b4f4f"
VAR: Final = "4d21b016-b534-45c2-a9fb-5c16e091fd2d"

# GPT attribute bits with a DPS meaning (bits 48-63 are type-specific in UEFI).
ATTR_NO_AUTO: Final = 63
ATTR_READ_ONLY: Final = 60
ATTR_GROW_FS: Final = 59

EMPTY_LABEL: Final = "_empty"  # a free A/B slot, as systemd-sysupdate looks for it
SECTOR_SIZE: Final = 512
# Namespace of the UUIDs we derive: the same inputs give the same UUIDs (reproducible disks).
NAMESPACE: Final = "9c1c0a4e-3a55-4a2c-8f0e-5d0f2b7d6e11"


class GptError(ValueError):
    """The disk or image has no readable GPT."""


@dataclass(frozen=True)
class GptPartition:
    number: int  # 1-based, as in /dev/vdaN
    type: str  # lower-case GUID text
    uuid: str
    label: str
    first_lba: int
    last_lba: int
    attrs: int

    def start(self, sector_size: int = SECTOR_SIZE) -> int:
        return self.first_lba * sector_size

    def size(self, sector_size: int = SECTOR_SIZE) -> int:
        return (self.last_lba - self.first_lba + 1) * sector_size


def guid_text(raw: bytes) -> str:
    """16 bytes in text order (as the root hash halves are used) as GUID text."""
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def guid_from_gpt(raw: bytes) -> str:
    """A GUID as GPT stores it (first three fields little-endian) as GUID text."""
    a, b, c = struct.unpack_from("<IHH", raw)
    return f"{a:08x}-{b:04x}-{c:04x}-{raw[8:10].hex()}-{raw[10:16].hex()}"


def parse_gpt(read: Callable[[int, int], bytes], sector_size: int = SECTOR_SIZE) \
        -> list[GptPartition]:
    """The partitions of a GPT read through `read(offset, size) -> bytes` (a callable, so the
    same code reads an image file on the host and a block device on the machine)."""
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
        parts.append(GptPartition(i + 1, guid_from_gpt(raw[:16]), guid_from_gpt(raw[16:32]),
                                  name, first, last, attrs))
    return parts


def read_gpt(path: str | Path, sector_size: int = SECTOR_SIZE) -> list[GptPartition]:
    """The GPT of an image file or a block device node."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return parse_gpt(lambda off, size: os.pread(fd, size, off), sector_size)
    finally:
        os.close(fd)


GPT_ENTRIES: Final = 128  # entries in a table we write (the usual 16 KiB array)
GPT_ENTRY_SIZE: Final = 128


def guid_to_gpt(text: str) -> bytes:
    """GUID text as GPT stores it (first three fields little-endian); inverse of guid_from_gpt."""
    raw = bytes.fromhex(text.replace("-", ""))
    if len(raw) != 16:
        raise ValueError(f"not a GUID: {text!r}")
    return raw[3::-1] + raw[5:3:-1] + raw[7:5:-1] + raw[8:]


def random_guid() -> str:
    """A random (version 4) GUID as text: python3-minimal has no uuid module."""
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40
    raw[8] = (raw[8] & 0x3F) | 0x80
    return guid_text(bytes(raw))


def gpt_writes(parts: list[GptPartition], disk_bytes: int, disk_guid: str,
               sector_size: int = SECTOR_SIZE, first_lba: int = 2048) -> list[tuple[int, bytes]]:
    """The (offset, bytes) writes that give a disk of `disk_bytes` this partition table: the
    protective MBR, the primary header and entries at the start, the backup entries and header
    in the last sectors (where the firmware and repart look for them on a disk of that size).
    Entry `number` N goes to slot N of the array, as the kernel then names it (vdaN)."""
    total = disk_bytes // sector_size
    entries = bytearray(GPT_ENTRIES * GPT_ENTRY_SIZE)
    entry_sectors = len(entries) // sector_size
    last_usable = total - 2 - entry_sectors
    used: list[tuple[int, int]] = []
    for p in parts:
        if not 1 <= p.number <= GPT_ENTRIES:
            raise GptError(f"partition number {p.number} is outside 1..{GPT_ENTRIES}")
        if p.first_lba < first_lba or p.last_lba > last_usable or p.last_lba < p.first_lba:
            raise GptError(f"partition {p.number} ({p.label!r}, LBA {p.first_lba}-{p.last_lba}) "
                           f"does not fit the usable LBAs {first_lba}-{last_usable}")
        if any(p.first_lba <= b and a <= p.last_lba for a, b in used):
            raise GptError(f"partition {p.number} ({p.label!r}) overlaps another one")
        used.append((p.first_lba, p.last_lba))
        name = p.label.encode("utf-16-le")
        if len(name) > 72:
            raise GptError(f"partition {p.number}: label {p.label!r} is longer than 36 characters")
        off = (p.number - 1) * GPT_ENTRY_SIZE
        entries[off:off + GPT_ENTRY_SIZE] = (
            guid_to_gpt(p.type) + guid_to_gpt(p.uuid)
            + struct.pack("<QQQ", p.first_lba, p.last_lba, p.attrs) + name.ljust(72, b"\0"))
    entries_crc = binascii.crc32(entries)

    def header(my_lba: int, alt_lba: int, entries_lba: int) -> bytes:
        h = bytearray(struct.pack(
            "<8sIIIIQQQQ16sQIII", b"EFI PART", 0x00010000, 92, 0, 0, my_lba, alt_lba,
            first_lba, last_usable, guid_to_gpt(disk_guid), entries_lba, GPT_ENTRIES,
            GPT_ENTRY_SIZE, entries_crc))
        struct.pack_into("<I", h, 16, binascii.crc32(h))
        return bytes(h).ljust(sector_size, b"\0")

    mbr = bytearray(sector_size)
    # One partition of type 0xEE over the whole disk (capped at 2^32-1 sectors), boot signature.
    mbr[446:462] = struct.pack("<B3sB3sII", 0, b"\x00\x02\x00", 0xEE, b"\xff\xff\xff", 1,
                               min(total - 1, 0xFFFFFFFF))
    mbr[510:512] = b"\x55\xaa"
    backup_entries = total - 1 - entry_sectors
    return [
        (0, bytes(mbr) + header(1, total - 1, 2) + bytes(entries)),
        (backup_entries * sector_size, bytes(entries) + header(total - 1, 1, backup_entries)),
    ]


# --- partition UUIDs of a verity slot --------------------------------------------------------


def verity_partition_uuids(root_hash: bytes | str) -> tuple[str, str]:
    """(data, hash) partition UUIDs of a verity pair: the first and last 128 bits of the root
    hash, bytes in order, no version bits forced; what systemd-repart assigns and the
    veritysetup generator looks up from usrhash=."""
    raw = bytes.fromhex(root_hash) if isinstance(root_hash, str) else root_hash
    if len(raw) < 16:
        raise ValueError(f"root hash is {len(raw)} bytes; at least 16 are needed")
    return guid_text(raw[:16]), guid_text(raw[-16:])


def uuid5(namespace: str, name: str) -> str:
    """RFC 4122 name-based (SHA-1) UUID text, as uuid.uuid5 makes it (python3-minimal has no
    uuid module)."""
    digest = bytearray(hashlib.sha1(bytes.fromhex(namespace.replace("-", ""))
                                    + name.encode()).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50
    digest[8] = (digest[8] & 0x3F) | 0x80
    return guid_text(bytes(digest))


def verity_sig_uuid(usr_uuid: str, verity_uuid: str) -> str:
    """The usr-verity-sig partition has no UUID of its own in usrhash=: derived from the pair."""
    return uuid5(NAMESPACE, f"{usr_uuid}/{verity_uuid}/verity-sig")


# --- SHA256SUMS -------------------------------------------------------------------------------

SHA256SUMS: Final = "SHA256SUMS"
_SUMS_LINE = re.compile(r"^([0-9a-fA-F]{64}) [ *](.+)$")


def parse_sha256sums(text: str) -> dict[str, str]:
    """sha256sum(1) output (text or binary mode) -> file name -> lower-case hex digest."""
    sums: dict[str, str] = {}
    for line in text.splitlines():
        m = _SUMS_LINE.match(line)
        if m:
            sums[m.group(2)] = m.group(1).lower()
    return sums


def read_sha256sums(path: Path) -> dict[str, str]:
    """SHA256SUMS from a file; a missing file is an empty index."""
    try:
        return parse_sha256sums(path.read_text())
    except FileNotFoundError:
        return {}


def format_sha256sums(entries: dict[str, str]) -> str:
    """The index text, sorted by name (so the same entries give the same bytes)."""
    return "".join(f"{digest}  {name}\n" for name, digest in sorted(entries.items()))


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks (images are too large to read whole)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# --- the build manifest -----------------------------------------------------------------------

MANIFEST_SUFFIX: Final = ".manifest.json"


def artifact_stem(image_id: str, version: str) -> str:
    """`<id>_<version>`: the stem of every build artifact and the label of a usr slot."""
    return f"{image_id}_{version}"


@dataclass
class Manifest:
    """`<id>_<version>.manifest.json`: what one build contains. Written by the builder; read
    by publish, `particle ext build --base`, `particle diff` and machines."""

    id: str
    version: str
    release: str
    architecture: str
    kernel: str
    usr_filesystem: str
    root_hash: str
    spec_digest: str = ""
    tree_key: str = ""
    tree_path: str = ""  # how the package tree was made (cache hit, layered, cold)
    mirror: str = ""
    sizes: dict[str, int] = field(default_factory=dict)
    packages: dict[str, str] = field(default_factory=dict)
    extensions: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # keys of newer writers, kept as read

    @property
    def name(self) -> str:
        return artifact_stem(self.id, self.version) + MANIFEST_SUFFIX

    @property
    def stem(self) -> str:
        return artifact_stem(self.id, self.version)

    def to_json(self) -> str:
        data = {k: v for k, v in self.__dict__.items() if k != "extra"}
        return json.dumps({**self.extra, **data}, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("a manifest is a JSON object")
        known = {k for k in cls.__dataclass_fields__ if k != "extra"}
        missing = [k for k in ("id", "version", "root_hash") if k not in data]
        if missing:
            raise ValueError(f"missing key(s): {', '.join(missing)}")
        args = {k: data[k] for k in known if k in data}
        args["version"] = str(args["version"])
        args.setdefault("release", "")
        args.setdefault("architecture", "x86-64")
        args.setdefault("kernel", "")
        args.setdefault("usr_filesystem", "erofs")
        return cls(**args, extra={k: v for k, v in data.items() if k not in known})

    @classmethod
    def read(cls, path: Path) -> Manifest:
        return cls.from_json(path.read_text())


def build_manifests(build_dir: Path) -> list[tuple[Path, Manifest]]:
    """Every manifest in a build output directory, with its path (unreadable ones skipped)."""
    found = []
    for path in sorted(build_dir.glob("*" + MANIFEST_SUFFIX)):
        try:
            found.append((path, Manifest.read(path)))
        except (OSError, ValueError):
            continue
    return found


# --- an update source and the files it publishes ------------------------------------------

SIGNATURE: Final = SHA256SUMS + ".gpg"  # the detached OpenPGP signature of the index
# The parts of a version an update installs, in sysupdate's order (the UKI, which makes the
# version bootable, last); the usr-verity-sig part only on images that sign their root hash.
PART_SUFFIXES: Final = (".usr-verity-sig.raw", ".usr-verity.raw", ".usr.raw", ".efi")
REQUIRED_PART_SUFFIXES: Final = (".usr-verity.raw", ".usr.raw", ".efi")
# The same transfers as /usr/lib/sysupdate.d with a local source: the machine puts a version's
# files into INCOMING_DIR itself (rebuilt from chunks, or fetched from a registry), verifies
# them, and lets sysupdate install them from there (`--definitions=`).
LOCAL_SYSUPDATE_DIR: Final = "usr/lib/particle/sysupdate.local.d"  # below the image's root
INCOMING_DIR: Final = "/var/lib/particle/incoming"
# The `[update] source` of an image whose updates sysupdate cannot fetch itself (a registry),
# written by the build below the image's root, read by the machine's `particle update`.
SOURCE_FILE: Final = "usr/lib/particle/update-source"
# A registry source's scheme -> the scheme its API is spoken in (oci+http: loopback/test ones).
OCI_SCHEMES: Final = {"oci": "https", "oci+http": "http"}
_PUBLISHED = re.compile(r"^([A-Za-z0-9.~^-]+?)(?:_[0-9a-fA-F-]{32,36})?"
                        r"(\.usr\.raw|\.usr-verity\.raw|\.usr-verity-sig\.raw)$"
                        r"|^([A-Za-z0-9.~^-]+?)(\.efi|\.manifest\.json)$")


def is_oci(source: str | None) -> bool:
    """A registry source: `particle update` fetches and verifies, sysupdate installs locally."""
    return bool(source) and str(source).startswith(tuple(f"{s}://" for s in OCI_SCHEMES))


def parse_published_name(name: str, image_id: str) -> tuple[str, str] | None:
    """(version, suffix) of a file `particle publish` serves for `image_id`:
    `ID_VERSION[_UUID].usr.raw` (and the hash tree and its signature), `ID_VERSION.efi`,
    `ID_VERSION.manifest.json`; None for any other name."""
    if not name.startswith(f"{image_id}_"):
        return None
    m = _PUBLISHED.match(name[len(image_id) + 1 :])
    if not m:
        return None
    return (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))


# --- the chunk store (delta updates) ----------------------------------------------------------
#
# Next to SHA256SUMS in a publish directory:
#   chunks/<first 4 hex>/<sha256 hex of the uncompressed chunk>.zz   zlib-compressed chunk
#   chunks.<published file>.json                                      its ChunkIndex (JSON)
# The index is listed in SHA256SUMS, so it is signed with the rest; a chunk is trusted because
# the signed index names its digest. A machine rebuilds a file from the chunks it already has
# (the running slot, with the running version's index as its map) and fetches only the others.

CHUNKS_DIR: Final = "chunks"
CHUNK_SUFFIX: Final = ".zz"
# An index is named `chunks.F.json`, not `F.chunks`: systemd-sysupdate 257 matches a pattern
# such as `ID_@v.efi` against `ID_V.efi.chunks` too (it ignores what follows the pattern), and
# installed an index as the UKI in the update test. No transfer pattern starts with `chunks.`.
CHUNK_INDEX_PREFIX: Final = "chunks."
CHUNK_INDEX_SUFFIX: Final = ".json"
CHUNK_INDEX_FORMAT: Final = 1
CHUNK_ZLIB_LEVEL: Final = 6
_HEX64 = re.compile(r"^[0-9a-f]{64}$")

# Content-defined chunking: FastCDC as the `fastcdc` package (PyPI, 1.x) cuts, with its gear
# table: a cut depends only on the bytes since the chunk began, so an insertion moves the cuts
# near it and those after it fall back into step at the next common cut. The host uses the
# package's compiled chunker (particleos.store.chunker); cdc_next_cut below is the same
# algorithm in plain Python for a machine that must chunk a seed that has no index.
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


class ChunkError(ValueError):
    """A chunk index or chunk that is malformed or does not match its digest."""


def chunk_relpath(digest: str) -> str:
    """Where a chunk lies below the publish directory (also its URL path there)."""
    return f"{CHUNKS_DIR}/{digest[:4]}/{digest}{CHUNK_SUFFIX}"


def chunk_path(store_root: Path, digest: str) -> Path:
    """A chunk's file in the publish directory `store_root`."""
    return store_root / chunk_relpath(digest)


def chunk_index_name(file: str) -> str:
    """The index's name for a published file: `chunks.F.json`."""
    return CHUNK_INDEX_PREFIX + file + CHUNK_INDEX_SUFFIX


def chunk_index_file(name: str) -> str | None:
    """The published file a chunk index name describes (None: not an index name)."""
    if name.startswith(CHUNK_INDEX_PREFIX) and name.endswith(CHUNK_INDEX_SUFFIX):
        return name[len(CHUNK_INDEX_PREFIX) : -len(CHUNK_INDEX_SUFFIX)] or None
    return None


def encode_chunk(data: bytes) -> bytes:
    """A chunk as stored (zlib: in python3-minimal, and erofs content is compressed already)."""
    return zlib.compress(data, CHUNK_ZLIB_LEVEL)


def decode_chunk(stored: bytes, digest: str, size: int) -> bytes:
    """The chunk from its stored bytes, checked against the digest and size its index gives."""
    try:
        d = zlib.decompressobj()
        data = d.decompress(stored, size + 1)
        if not d.eof or d.unused_data or len(data) != size:
            raise ChunkError(f"chunk {digest}: not a {size}-byte zlib stream")
    except zlib.error as e:
        raise ChunkError(f"chunk {digest}: {e}") from None
    if hashlib.sha256(data).hexdigest() != digest:
        raise ChunkError(f"chunk {digest}: digest mismatch")
    return data


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


@dataclass
class ChunkIndex:
    """`chunks.F.json`: a published file as chunks in file order (offsets are the running sum).
    `chunks` holds [sha256 hex of the chunk, its size, its stored (compressed) size]: the
    stored size lets a machine say what it will download before it fetches anything."""

    file: str
    size: int
    sha256: str
    chunker: dict[str, Any]
    chunks: list[tuple[str, int, int]]
    format: int = CHUNK_INDEX_FORMAT

    def to_bytes(self) -> bytes:
        self.validate()
        data = {"format": self.format, "file": self.file, "size": self.size,
                "sha256": self.sha256, "chunker": self.chunker,
                "chunks": [list(c) for c in self.chunks]}
        return (json.dumps(data, sort_keys=True, separators=(",", ":")) + "\n").encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> ChunkIndex:
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, ValueError) as e:
            raise ChunkError(f"chunk index: not JSON ({e})") from None
        if not isinstance(data, dict):
            raise ChunkError("chunk index: not a JSON object")
        if data.get("format") != CHUNK_INDEX_FORMAT:
            raise ChunkError(f"chunk index: format {data.get('format')!r} "
                             f"(this side reads {CHUNK_INDEX_FORMAT})")
        try:
            chunks = [(str(c[0]), int(c[1]), int(c[2])) for c in data["chunks"]]
            index = cls(file=str(data["file"]), size=int(data["size"]),
                        sha256=str(data["sha256"]), chunker=dict(data["chunker"]),
                        chunks=chunks)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ChunkError(f"chunk index: malformed ({e!r})") from None
        index.validate()
        return index

    @classmethod
    def read(cls, path: Path) -> ChunkIndex:
        return cls.from_bytes(path.read_bytes())

    def validate(self) -> None:
        if not self.file or "/" in self.file:
            raise ChunkError(f"chunk index: bad file name {self.file!r}")
        if not _HEX64.match(self.sha256):
            raise ChunkError(f"chunk index of {self.file}: bad sha256 {self.sha256!r}")
        for digest, size, stored in self.chunks:
            if not _HEX64.match(digest):
                raise ChunkError(f"chunk index of {self.file}: bad chunk digest {digest!r}")
            if size <= 0 or stored <= 0:
                raise ChunkError(f"chunk index of {self.file}: chunk {digest} has size {size}"
                                 f" (stored {stored})")
        total = sum(c[1] for c in self.chunks)
        if total != self.size:
            raise ChunkError(f"chunk index of {self.file}: chunks add up to {total} bytes, "
                             f"the file has {self.size}")

    def offsets(self) -> list[tuple[str, int, int]]:
        """(digest, offset, size) of every chunk, in file order."""
        out, off = [], 0
        for digest, size, _ in self.chunks:
            out.append((digest, off, size))
            off += size
        return out

    def digests(self) -> set[str]:
        return {c[0] for c in self.chunks}

    def stored_sizes(self) -> dict[str, int]:
        return {c[0]: c[2] for c in self.chunks}


@dataclass
class Seed:
    """A local file whose chunks may be reused (a usr slot, a UKI), with the index of the
    version it holds: chunk offsets come from the index, each chunk read is checked."""

    path: Path
    index: ChunkIndex


@dataclass
class DeltaPlan:
    """What rebuilding a file takes: chunks found in seeds, chunks to download."""

    seeded: dict[str, tuple[int, int]]  # digest -> (seed number, offset)
    missing: dict[str, int]  # digest -> stored size, each once
    file_size: int

    @property
    def download_bytes(self) -> int:
        return sum(self.missing.values())


def plan_delta(index: ChunkIndex, seeds: list[Seed]) -> DeltaPlan:
    """Which chunks of `index` the seeds have (by their indexes) and which must be fetched."""
    have: dict[str, tuple[int, int]] = {}
    for n, seed in enumerate(seeds):
        for digest, offset, _ in seed.index.offsets():
            have.setdefault(digest, (n, offset))
    seeded, missing = {}, {}
    for digest, _, stored in index.chunks:
        if digest in have:
            seeded[digest] = have[digest]
        else:
            missing[digest] = stored
    return DeltaPlan(seeded, missing, index.size)


@dataclass
class ReconstructStats:
    chunks: int = 0
    seeded_bytes: int = 0  # taken from local seeds
    fetched_chunks: int = 0
    fetched_bytes: int = 0  # downloaded (stored, compressed) bytes


def reconstruct(index: ChunkIndex, out: Any, seeds: list[Seed],
                fetch: Callable[[str], bytes],
                progress: Callable[[ReconstructStats], None] | None = None) -> ReconstructStats:
    """Write the file `index` describes to the binary file object `out`, sequentially: chunks
    from the seeds where their bytes match, the rest through `fetch(digest) -> stored bytes`
    (e.g. an HTTP GET of chunk_relpath(digest)). Every chunk is checked, then the whole file's
    sha256; a mismatch raises ChunkError (the caller falls back to the full download)."""
    plan = plan_delta(index, seeds)
    fds = [os.open(s.path, os.O_RDONLY | os.O_CLOEXEC) for s in seeds]
    repeats: dict[str, int] = {}
    for digest, _, _ in index.chunks:
        repeats[digest] = repeats.get(digest, 0) + 1
    kept: dict[str, bytes] = {}  # fetched chunks that occur again later
    stats = ReconstructStats()
    whole = hashlib.sha256()
    try:
        for digest, size, _ in index.chunks:
            data = kept.get(digest)
            if data is None and digest in plan.seeded:
                n, offset = plan.seeded[digest]
                raw = os.pread(fds[n], size, offset)
                if len(raw) == size and hashlib.sha256(raw).hexdigest() == digest:
                    data = raw
                    stats.seeded_bytes += size
            if data is None:
                stored = fetch(digest)
                data = decode_chunk(stored, digest, size)
                stats.fetched_chunks += 1
                stats.fetched_bytes += len(stored)
                if repeats[digest] > 1:
                    kept[digest] = data
            out.write(data)
            whole.update(data)
            stats.chunks += 1
            if progress is not None:
                progress(stats)
    finally:
        for fd in fds:
            os.close(fd)
    if whole.hexdigest() != index.sha256:
        raise ChunkError(f"{index.file}: reassembled file does not match its sha256")
    return stats


# --- a version as an OCI artifact (written by `particle push`, read by machines) --------------

OCI_ARTIFACT_TYPE: Final = "application/vnd.particleos.version.v1"
OCI_TITLE: Final = "org.opencontainers.image.title"  # a layer's served file name
OCI_VERSION: Final = "org.opencontainers.image.version"  # the exact version (tags cannot hold ~)
OCI_ID: Final = "org.particleos.id"


def oci_version_tag(version: str) -> str:
    """The tag of a version: tags allow [A-Za-z0-9_.-] only, so `2.0~rc1` is tagged `2.0_rc1`
    (the exact version is in the manifest's annotations)."""
    tag = re.sub(r"[^A-Za-z0-9_.-]", "_", version)[:128]
    return tag if re.match(r"^[A-Za-z0-9_]", tag) else f"v{tag}"[:128]


def auth_file_credentials(path: Path, keys: list[str]) -> tuple[str, str] | None:
    """(user, password) for the first of `keys` (registry host spellings) in a containers
    `auth.json` / docker `config.json` (`auths.KEY.auth` = base64 of `user:password`), the
    files `particle push` and machines read. None when the file or the entry is missing;
    ValueError saying why when the file cannot be read or the entry is malformed."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: cannot read registry credentials: {err}") from None
    auths = data.get("auths") if isinstance(data, dict) else None
    if not isinstance(auths, dict):
        return None
    for key in keys:
        entry = auths.get(key)
        if isinstance(entry, dict) and isinstance(entry.get("auth"), str):
            try:
                raw = binascii.a2b_base64(entry["auth"], strict_mode=True).decode()
            except (ValueError, UnicodeDecodeError):
                raw = ""
            user, sep, password = raw.partition(":")
            if not sep:
                raise ValueError(f"{path}: auths.{key}.auth is not base64 of user:password")
            return user, password
    return None
