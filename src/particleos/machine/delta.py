"""Delta updates on the machine: the new version's files are rebuilt from chunks this machine
already has (the running /usr slot, the other slot, the UKIs on the ESP) plus the chunks the
update source's store holds that it lacks; then they are installed by systemd-sysupdate from
a local directory (`update.install_local`), with every guarantee of the download path.

Why no chunker here: the store's per-file indexes (`chunks.F.json`, listed in the signed
SHA256SUMS) say which chunk lies where in each published file. The seeds are located by the
index of the version they hold (kept in /var/lib/particle/chunks after each install, fetched
from the source when missing), and a seed chunk is used only after its sha256 matches, so a
stale or foreign seed costs a download, never a wrong byte. Missing chunks are fetched with
one curl process per batch (`--parallel --config`: python3-minimal has no HTTP client),
decompressed (zlib) and verified; the whole file is checked against SHA256SUMS before it is
renamed into place.

Anything that makes the delta impossible (no store, an index or chunk failing its digest, too
little space) raises DeltaError: `particle update` says so in one line and falls back to the
full download by systemd-sysupdate.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..formats import (
    INCOMING_DIR,
    MANIFEST_SUFFIX,
    PART_SUFFIXES,
    REQUIRED_PART_SUFFIXES,
    SHA256SUMS,
    SIGNATURE,
    ChunkError,
    ChunkIndex,
    chunk_index_file,
    chunk_index_name,
    chunk_relpath,
    decode_chunk,
    parse_published_name,
    parse_sha256sums,
    sha256_file,
)
from .files import clear_dir, fsync_dir, write_atomic
from .signature import KEYRINGS, SignatureError, update_keyring
from .signature import verify as verify_signature
from .versions import vercmp, version_key

STATE = Path("/var/lib/particle")
INCOMING = Path(INCOMING_DIR)
KEPT = STATE / "chunks"  # indexes and manifests of the versions this machine holds
BATCH_BYTES = 4 << 20  # chunks fetched per curl run: progress lines, and a bounded temp dir
PARALLEL = 4  # connections at once (each is a new connection: static servers close them)

Say = Callable[[str], None]


class DeltaError(Exception):
    """Why the delta path cannot be used; the update then downloads the whole version."""


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


# ---------------------------------------------------------------------------- the source


@dataclass(frozen=True)
class Source:
    """The update source: an http(s) URL or a directory (read through curl's file://)."""

    base: str

    def url(self, name: str) -> str:
        if "://" in self.base:
            return self.base.rstrip("/") + "/" + name
        return "file://" + os.path.abspath(os.path.join(self.base, name))


def curl_config(items: Iterable[tuple[str, Path]]) -> str:
    """A curl --config file that downloads each URL to its path."""
    def quote(s: str) -> str:
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return "".join(f"url = {quote(u)}\noutput = {quote(str(p))}\n" for u, p in items)


def fetch(source: Source, items: list[tuple[str, Path]], work: Path) -> None:
    """Download the source's files `name -> path` with one curl process (parallel
    connections). A file that could not be fetched is missing afterwards; the callers check
    every file's digest, so curl's exit status only decides the message."""
    if not items:
        return
    config = work / ".curl-config"
    config.write_text(curl_config((source.url(n), p) for n, p in items))
    argv = ["curl", "--parallel", "--parallel-max", str(PARALLEL), "--fail", "--silent",
            "--show-error", "--location", "--retry", "2", "--connect-timeout", "30",
            "--speed-limit", "1024", "--speed-time", "120",
            "--config", str(config)]
    try:
        proc = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, check=False)
    except FileNotFoundError as err:
        raise DeltaError("curl is not in this image") from err
    finally:
        with contextlib.suppress(FileNotFoundError):
            config.unlink()
    missing = [n for n, p in items if not p.is_file()]
    if missing:
        detail = proc.stderr.strip().splitlines()[-1:] or [f"curl exited {proc.returncode}"]
        raise DeltaError(f"could not fetch {missing[0]}"
                         + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
                         + f" ({detail[0]})")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch_verified(source: Source, name: str, want: str, work: Path) -> bytes:
    """A small published file (index, manifest), checked against its SHA256SUMS digest."""
    dest = work / f".{name}.get"
    try:
        fetch(source, [(name, dest)], work)
        data = dest.read_bytes()
    finally:
        with contextlib.suppress(FileNotFoundError):
            dest.unlink()
    if sha256_bytes(data) != want:
        raise DeltaError(f"{name} does not match its digest in SHA256SUMS")
    return data


def read_published(source: Source, work: Path, verify: bool) -> dict[str, str]:
    """The source's SHA256SUMS (name -> sha256), its signature checked when `verify`."""
    sums = work / SHA256SUMS
    items = [(SHA256SUMS, sums)]
    if verify:
        items.append((SIGNATURE, work / SIGNATURE))
    try:
        fetch(source, items, work)
        if verify:
            keyring = update_keyring(KEYRINGS)
            if keyring is None:
                raise DeltaError("updates must be verified but the image has no "
                                 "import-pubring.gpg")
            try:
                verify_signature(sums, work / SIGNATURE, keyring, work / ".gnupg")
            except SignatureError as err:
                raise DeltaError("SHA256SUMS.gpg does not verify with this machine's update "
                                 f"key: {err}") from None
        return parse_sha256sums(sums.read_text())
    finally:
        for _, p in items:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


# ------------------------------------------------------------------------- versions, files


def version_files(sums: dict[str, str], image_id: str) -> dict[str, dict[str, str]]:
    """Published version -> {part suffix: file name} for the parts an update installs."""
    found: dict[str, dict[str, str]] = {}
    for name in sums:
        parsed = parse_published_name(name, image_id)
        if parsed and parsed[1] in PART_SUFFIXES:
            found.setdefault(parsed[0], {})[parsed[1]] = name
    return found


def newest(sums: dict[str, str], image_id: str, signed: bool) -> tuple[str, dict[str, str]] | None:
    """The newest version whose every part is published (as sysupdate picks it)."""
    need = set(REQUIRED_PART_SUFFIXES) | ({PART_SUFFIXES[0]} if signed else set())
    complete = {v: f for v, f in version_files(sums, image_id).items() if need <= f.keys()}
    if not complete:
        return None
    best = max(complete, key=version_key)
    return best, complete[best]


# ----------------------------------------------------------------------------- the planner


@dataclass(frozen=True)
class Seed:
    """A file or block device on this machine that holds the content `index` describes
    (believed: every chunk read from it is checked)."""

    path: str
    index: ChunkIndex
    what: str  # for messages: "slot A (2.0.1)", "UKI 2.0.1"


@dataclass(frozen=True)
class Location:
    path: str
    offset: int
    size: int


def seed_locations(seeds: Iterable[Seed]) -> dict[str, list[Location]]:
    """Chunk digest -> where seeds claim to hold it (first seed first)."""
    found: dict[str, list[Location]] = {}
    for seed in seeds:
        for digest, offset, size in seed.index.offsets():
            where = found.setdefault(digest, [])
            if len(where) < 2:  # a second place covers a bad first; more cost only lookups
                where.append(Location(seed.path, offset, size))
    return found


def estimate(target: ChunkIndex, known: set[str]) -> int:
    """Bytes of chunks to fetch for `target` (as stored: compressed) when the chunks in
    `known` are here, from the indexes alone (seeds not read yet)."""
    stored = target.stored_sizes()
    return sum(stored[digest] for digest in target.digests() - known)


# Fetches chunks (digest, size, stored size), yielding (digest, the chunk's bytes), each
# checked against its digest (decode_chunk does): reconstruct writes them as they come.
ChunkFetcher = Callable[[list[tuple[str, int, int]]], Iterator[tuple[str, bytes]]]


@dataclass
class Result:
    local: int = 0  # bytes copied from seeds
    fetched_chunks: int = 0
    fetched: int = 0  # bytes of chunks fetched (uncompressed)
    fetched_stored: int = 0  # the same as downloaded (compressed)
    bad_seeds: int = 0  # seed chunks that failed their digest (used from elsewhere)


def reconstruct(target: ChunkIndex, want_sha256: str, dest: Path,
                locations: dict[str, list[Location]], fetch_chunks: ChunkFetcher,
                say: Say) -> Result:
    """Write `dest` (the file `target` indexes) from verified seed chunks and fetched ones:
    a temporary name, fsync, the whole file's sha256 against SHA256SUMS, then rename."""
    if target.sha256 != want_sha256:
        raise DeltaError(f"{chunk_index_name(target.file)} describes another file than "
                         "SHA256SUMS lists")
    result = Result()
    places: dict[str, list[int]] = {}
    for digest, offset, _ in target.offsets():
        places.setdefault(digest, []).append(offset)
    sizes = {d: (s, z) for d, s, z in target.chunks}
    tmp = dest.with_name(f".{dest.name}.part")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    seeds: dict[str, int] = {}
    try:
        os.ftruncate(fd, target.size)
        missing: list[tuple[str, int, int]] = []
        for digest, offs in places.items():
            data = None
            for loc in locations.get(digest, []):
                if loc.path not in seeds:
                    try:
                        seeds[loc.path] = os.open(loc.path, os.O_RDONLY | os.O_CLOEXEC)
                    except OSError:
                        seeds[loc.path] = -1
                if seeds[loc.path] < 0:
                    continue
                piece = os.pread(seeds[loc.path], loc.size, loc.offset)
                if sha256_bytes(piece) == digest:
                    data = piece
                    break
                result.bad_seeds += 1
            if data is None:
                missing.append((digest, *sizes[digest]))
                continue
            for off in offs:
                os.pwrite(fd, data, off)
                result.local += len(data)
        say(f"{dest.name}: {mib(result.local)} from this machine, {len(missing)} chunks "
            f"({mib(sum(z for _, _, z in missing))}) to fetch")
        for digest, data in fetch_chunks(missing):  # checked by the fetcher (decode_chunk)
            for off in places[digest]:
                os.pwrite(fd, data, off)
            result.fetched_chunks += 1
            result.fetched += len(data)
            result.fetched_stored += sizes[digest][1]
        if result.fetched_chunks != len(missing):
            raise DeltaError(f"{target.file}: {len(missing) - result.fetched_chunks} chunks "
                             "were not fetched")
        os.fsync(fd)
        h = hashlib.sha256()
        pos = 0
        while pos < target.size:
            block = os.pread(fd, min(1 << 20, target.size - pos), pos)
            if not block:
                break
            h.update(block)
            pos += len(block)
        if h.hexdigest() != want_sha256:
            raise DeltaError(f"{dest.name} rebuilt from chunks does not match SHA256SUMS")
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    finally:
        os.close(fd)
        for s in seeds.values():
            if s >= 0:
                os.close(s)
    os.rename(tmp, dest)
    fsync_dir(dest.parent)
    return result


def store_fetcher(source: Source, work: Path, say: Say,
                  batch_bytes: int = BATCH_BYTES) -> ChunkFetcher:
    """Fetch chunks from the source's store in batches (one curl process each), yielding
    (digest, decompressed bytes); progress after each batch."""
    def run(missing: list[tuple[str, int, int]]) -> Iterator[tuple[str, bytes]]:
        total = sum(z for _, _, z in missing)
        got = 0
        batch: list[tuple[str, int, int]] = []
        for i, item in enumerate(missing):
            batch.append(item)
            if sum(z for _, _, z in batch) < batch_bytes and i + 1 < len(missing):
                continue
            items = [(chunk_relpath(d), work / f"{d}.zz") for d, _, _ in batch]
            fetch(source, items, work)
            for (digest, size, _), (_, path) in zip(batch, items, strict=True):
                raw = path.read_bytes()
                path.unlink()
                got += len(raw)
                try:
                    data = decode_chunk(raw, digest, size)
                except ChunkError as err:
                    why = str(err).split(": ", 1)[-1]
                    raise DeltaError(f"chunk {digest[:12]}... from the store is corrupt "
                                     f"({why})") from None
                yield digest, data
            say(f"fetched {mib(got)} of {mib(total)}")
            batch = []
    return run


# ------------------------------------------------------------------------- kept indexes


def kept_index(name: str) -> ChunkIndex | None:
    try:
        return ChunkIndex.from_bytes((KEPT / chunk_index_name(name)).read_bytes())
    except (OSError, ValueError):
        return None


def keep_file(name: str, data: bytes) -> None:
    """Keep an index or manifest of a version this machine holds (temp, fsync, rename)."""
    write_atomic(KEPT / name, data)


def prune_kept(versions_here: set[str], image_id: str) -> None:
    """Drop the kept files of versions no longer on this machine."""
    for path in KEPT.iterdir() if KEPT.is_dir() else []:
        parsed = parse_published_name(chunk_index_file(path.name) or path.name, image_id)
        if path.name.startswith(".") or (parsed and parsed[0] not in versions_here):
            with contextlib.suppress(OSError):
                path.unlink()


def seed_index(name: str, sums: dict[str, str], source: Source, work: Path) -> ChunkIndex | None:
    """The index of a file this machine holds: kept locally, else from the source (then kept)."""
    found = kept_index(name)
    if found is not None:
        return found
    want = sums.get(chunk_index_name(name))
    if want is None:
        return None
    try:
        data = fetch_verified(source, chunk_index_name(name), want, work)
        index = ChunkIndex.from_bytes(data)
    except (DeltaError, ValueError):
        return None
    with contextlib.suppress(OSError):
        keep_file(chunk_index_name(name), data)
    return index


# ------------------------------------------------------------------------ the whole update


@dataclass(frozen=True)
class Held:
    """A file of a version this machine holds: its published name and where its bytes are."""

    name: str
    path: str
    what: str  # for messages


@dataclass
class Offer:
    """The newest published version, when it is newer than the running one."""

    version: str
    files: dict[str, str]  # part suffix -> published name
    sums: dict[str, str]


@dataclass
class Staged:
    """A version rebuilt in INCOMING, ready for `update.install_local()`."""

    version: str
    keep: dict[str, bytes]  # indexes and manifest, kept in KEPT once installed
    fetched: int = 0  # bytes downloaded (chunks as stored, indexes, small files)
    full: int = 0  # what the full download is


def offer(source: Source, image_id: str, running: str, *, verify: bool, signed: bool,
          work: Path) -> Offer | None:
    """The newest complete version at the source if it is newer than `running`."""
    sums = read_published(source, work, verify)
    found = newest(sums, image_id, signed)
    if found is None or vercmp(found[0], running) <= 0:
        return None
    return Offer(found[0], found[1], sums)


def target_indexes(o: Offer, source: Source, work: Path) -> dict[str, tuple[ChunkIndex, bytes]]:
    """Published name -> its chunk index (fetched, digest-checked) for each part that has one."""
    out: dict[str, tuple[ChunkIndex, bytes]] = {}
    for name in o.files.values():
        want = o.sums.get(chunk_index_name(name))
        if want is None:
            continue
        data = fetch_verified(source, chunk_index_name(name), want, work)
        try:
            index = ChunkIndex.from_bytes(data)
        except ValueError as err:
            raise DeltaError(f"{chunk_index_name(name)}: {err}") from None
        if index.sha256 != o.sums[name]:
            raise DeltaError(f"{chunk_index_name(name)} describes another file than "
                             "SHA256SUMS lists")
        out[name] = (index, data)
    return out


def seeds_for(held: list[Held], sums: dict[str, str], source: Source, work: Path) -> list[Seed]:
    seeds = []
    for h in held:
        index = seed_index(h.name, sums, source, work)
        if index is not None:
            seeds.append(Seed(h.path, index, h.what))
    return seeds


@dataclass
class Preview:
    delta: int  # bytes a delta update downloads (chunks as stored, indexes, small files)
    full: int  # bytes of the full download
    seeds: list[str]


def preview(o: Offer, source: Source, held: list[Held], work: Path) -> Preview:
    """What updating to the offer costs, from the indexes alone (no seed is read)."""
    full = 0
    try:
        indexes = target_indexes(o, source, work)
    except DeltaError:
        indexes = {}
    seeds = seeds_for(held, o.sums, source, work) if indexes else []
    known = set(seed_locations(seeds))
    delta = sum(len(d) for _, d in indexes.values())
    for name in o.files.values():
        if name in indexes:
            full += indexes[name][0].size
            delta += estimate(indexes[name][0], known)
        else:
            size = remote_size(source, name)
            full += size
            delta += size
    return Preview(delta if indexes else full, full, [s.what for s in seeds])


def remote_size(source: Source, name: str) -> int:
    """The size of a published file (a HEAD request; a local file's size)."""
    if "://" not in source.base:
        try:
            return os.stat(os.path.join(source.base, name)).st_size
        except OSError:
            return 0
    proc = subprocess.run(["curl", "--head", "--silent", "--fail", "--location",
                           "--write-out", "%header{content-length}",
                           "--output", "/dev/null", source.url(name)],
                          capture_output=True, text=True, check=False)
    parts = proc.stdout.split()
    return int(parts[-1]) if parts and parts[-1].isdigit() else 0


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def stage(o: Offer, source: Source, held: list[Held], say: Say) -> Staged:
    """Rebuild every part of the offered version in INCOMING from seeds and the store (parts
    without an index, the small ones, are fetched whole), each checked against SHA256SUMS."""
    work = INCOMING / ".work"
    work.mkdir(parents=True, exist_ok=True)
    indexes = target_indexes(o, source, work)
    if not indexes:
        raise DeltaError(f"the source has no chunk store for {o.version}")
    staged = Staged(o.version, {chunk_index_name(n): d for n, (_, d) in indexes.items()})
    staged.fetched = sum(len(d) for d in staged.keep.values())
    need = sum(i.size for i, _ in indexes.values())
    if free_bytes(INCOMING) < need + (16 << 20):
        raise DeltaError(f"{mib(need)} needed in {INCOMING}, {mib(free_bytes(INCOMING))} free")
    seeds = seeds_for(held, o.sums, source, work)
    locations = seed_locations(seeds)
    expected = sum(estimate(i, set(locations)) for i, _ in indexes.values())
    say(f"delta update to {o.version}: seeds {', '.join(s.what for s in seeds) or 'none'}; "
        f"about {mib(expected)} of chunks to fetch for {mib(need)}")
    fetcher = store_fetcher(source, work, say)
    for suffix in PART_SUFFIXES:
        name = o.files.get(suffix)
        if name is None:
            continue
        dest = INCOMING / name
        if name in indexes:
            r = reconstruct(indexes[name][0], o.sums[name], dest, locations, fetcher, say)
            staged.fetched += r.fetched_stored
            staged.full += indexes[name][0].size
            if r.bad_seeds:
                say(f"{name}: {r.bad_seeds} chunks on this machine did not match their "
                    "index (fetched instead)")
            continue
        tmp = work / name
        fetch(source, [(name, tmp)], work)
        if sha256_file(tmp) != o.sums[name]:
            raise DeltaError(f"{name} does not match its digest in SHA256SUMS")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        staged.fetched += tmp.stat().st_size
        staged.full += tmp.stat().st_size
        os.rename(tmp, dest)
    fsync_dir(INCOMING)
    manifest = o.files[".efi"].removesuffix(".efi") + MANIFEST_SUFFIX
    if manifest in o.sums:
        with contextlib.suppress(DeltaError):
            staged.keep[manifest] = fetch_verified(source, manifest, o.sums[manifest], work)
    with contextlib.suppress(OSError):
        os.rmdir(work)
    return staged


def clean_incoming() -> None:
    """Remove what an earlier (interrupted) update left in INCOMING."""
    INCOMING.mkdir(parents=True, exist_ok=True)
    clear_dir(INCOMING)


FACTORY_DPKG_STATUS = Path("/usr/share/factory/var/lib/dpkg/status")


def packages_from_dpkg_status(text: str) -> dict[str, str]:
    """Installed packages -> versions from a dpkg status file (what the build manifest lists:
    the factory copy in /usr is the running version's own, whatever /var says)."""
    found: dict[str, str] = {}
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            key, sep, value = line.partition(":")
            if sep and not line.startswith((" ", "\t")):
                fields[key] = value.strip()
        if fields.get("Status", "").endswith(" installed") and "Package" in fields:
            found[fields["Package"]] = fields.get("Version", "")
    return found
