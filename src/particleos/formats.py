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


DOCKER_HUB: Final = "docker.io"
_REPOSITORY = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)"
                         r"[a-z0-9]+)*)*$")


def oci_repository(host: str, name: str) -> str | None:
    """The repository `name` as the registry at `host` knows it (Docker Hub's one-component
    names are `library/NAME`), or None when it is not a repository name (lower case letters,
    digits, `. _ -` within components, `/` between them)."""
    if host == DOCKER_HUB and "/" not in name:
        name = f"library/{name}"
    return name if _REPOSITORY.match(name) else None


def oci_api_host(host: str) -> str:
    """Where the registry `host` serves its API (Docker Hub's is not docker.io itself)."""
    return "registry-1.docker.io" if host == DOCKER_HUB else host


def auth_file_credentials(path: Path, host: str) -> tuple[str, str] | None:
    """(user, password) for the registry `host` in a containers `auth.json` / docker
    `config.json` (`auths.KEY.auth` = base64 of `user:password`, KEY the host as written, with
    a scheme, or Docker Hub's legacy index names), the files `particle push` and machines read.
    None when the file or the entry is missing; ValueError saying why when the file cannot be
    read or the entry is malformed."""
    keys = [host, f"https://{host}", f"http://{host}"]
    if host == DOCKER_HUB:
        keys += ["https://index.docker.io/v1/", "index.docker.io"]
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
