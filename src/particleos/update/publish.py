"""`particle publish`: add a built version to a static update directory that systemd-sysupdate
reads (over http(s), or as a local directory).

Order of operations, so that a client never sees an index naming a missing or half-written
file: the new files are copied under their final names first (unlisted files are ignored),
then (unless chunks=False) the chunks of the usr image, its verity tree, the UKI and the
extension images go into the chunk store (`chunks/`, see particleos.store) and their chunk
indexes are written, then SHA256SUMS (and its signature, when a signer is given) is replaced
atomically, and only then are the files of versions dropped by `keep` deleted and the chunks
no listed index names collected. All of it under one lock per directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..cache import atomic_file, fsync_path
from ..errors import ParticleError
from ..formats import (
    SHA256SUMS,
    build_manifests,
    chunk_index_file,
    chunk_index_name,
    format_sha256sums,
    parse_published_name,
    read_sha256sums,
    sha256_file,
    verity_partition_uuids,
    verity_sig_uuid,
)
from ..formats import SIGNATURE as SIGNATURE
from ..machine.versions import version_key
from ..store.store import GcStats, PutStats, collect_garbage, index_names, put_file
from .transfer import UKI, USR, VERITY, VERITY_SIG, Part, served_name

INDEX = SHA256SUMS
LOCK = ".particle-publish.lock"

# sign(index) writes a detached signature of `index` to `index` + ".gpg" (e.g. gpg
# --detach-sign); publish renames both into place together.
Signer = Callable[[Path], None]


@dataclass
class PublishResult:
    image_id: str
    version: str
    added: list[str] = field(default_factory=list)  # files copied (empty: already published)
    update_bytes: int = 0  # what a machine downloads for this version
    removed_versions: list[str] = field(default_factory=list)
    versions: list[str] = field(default_factory=list)  # published after this run, oldest first
    chunked: list[PutStats] = field(default_factory=list)  # files put into the chunk store
    gc: GcStats | None = None


@dataclass(frozen=True)
class BuiltVersion:
    image_id: str
    version: str
    files: dict[str, Path]  # served name -> build output
    chunkable: tuple[str, ...] = ()  # served names that go into the chunk store


def find_version(build_dir: Path, version: str | None = None) -> BuiltVersion:
    """The version to publish from a build output directory: `version`, or the newest one."""
    found = {m.version: (path, m) for path, m in build_manifests(build_dir)}
    if not found:
        raise ParticleError(f"{build_dir}: no *.manifest.json; run `particle build` first")
    if version is None:
        version = sorted(found, key=version_key)[-1]
    elif version not in found:
        raise ParticleError(
            f"{build_dir}: no build of version {version} (built: {', '.join(sorted(found))})"
        )
    path, manifest = found[version]
    usr_uuid, verity_uuid = verity_partition_uuids(manifest.root_hash)
    files: dict[str, Path] = {}
    wanted: list[tuple[Part, str | None]] = [
        (VERITY, verity_uuid), (USR, usr_uuid), (UKI, None)
    ]
    sig = build_dir / f"{manifest.stem}{VERITY_SIG.suffix}"
    if sig.exists():
        wanted.insert(0, (VERITY_SIG, verity_sig_uuid(usr_uuid, verity_uuid)))
    for part, uuid in wanted:
        src = build_dir / f"{manifest.stem}{part.suffix}"
        if not src.is_file():
            raise ParticleError(f"{build_dir}: {src.name} is missing; rebuild version {version}")
        files[served_name(manifest.id, version, part, uuid)] = src
    files[path.name] = path
    # System extensions built for this version travel with it: machines that installed one
    # fetch the matching version under its own name (see ext/transfer.py).
    for ext in manifest.extensions.values():
        src = build_dir / str(ext["file"])
        if not src.is_file():
            raise ParticleError(f"{build_dir}: extension {src.name} is missing; rebuild it")
        files[src.name] = src
    chunkable = tuple(n for n in files if not n.endswith((".manifest.json",
                                                           VERITY_SIG.suffix)))
    return BuiltVersion(manifest.id, version, files, chunkable)


def version_of(name: str, image_id: str) -> str | None:
    """The version in a published file name of `image_id` (`ID_VERSION[_UUID].suffix`, or a
    chunk index `chunks.that.json`)."""
    found = parse_published_name(chunk_index_file(name) or name, image_id)
    return found[0] if found else None


def publish(
    build_dir: Path,
    update_dir: Path,
    *,
    keep: int | None = None,
    version: str | None = None,
    sign: Signer | None = None,
    chunks: bool = True,
) -> PublishResult:
    """Copy one built version into `update_dir`, put it into the chunk store (`chunks`),
    rewrite its index, keep the newest `keep`."""
    if keep is not None and keep < 1:
        raise ParticleError(f"--keep {keep}: keep at least 1 version")
    built = find_version(build_dir, version)
    sums = read_sha256sums(build_dir / INDEX)
    update_dir.mkdir(parents=True, exist_ok=True)
    result = PublishResult(built.image_id, built.version)
    with _locked(update_dir):
        index = read_sha256sums(update_dir / INDEX)
        # Entries whose file is gone are dropped rather than served.
        index = {n: d for n, d in index.items() if (update_dir / n).is_file()}
        for name, src in built.files.items():
            digest = _copy(src, update_dir / name, index.get(name), sums.get(src.name))
            if digest != index.get(name):
                result.added.append(name)
            index[name] = digest
            if not name.endswith(".manifest.json"):
                result.update_bytes += src.stat().st_size
        if chunks:
            for name in built.chunkable:
                iname = chunk_index_name(name)
                if iname in index:  # the index holds only files that are there
                    continue  # this very file was chunked before (a version never changes)
                chunk_index, stats = put_file(update_dir, update_dir / name, name)
                data = chunk_index.to_bytes()
                with atomic_file(update_dir / iname) as tmp:
                    tmp.write_bytes(data)
                    tmp.chmod(0o644)
                index[iname] = hashlib.sha256(data).hexdigest()
                result.chunked.append(stats)
        versions = sorted(
            {v for n in index if (v := version_of(n, built.image_id))}, key=version_key
        )
        dropped = versions[:-keep] if keep is not None else []
        if built.version in dropped:
            raise ParticleError(
                f"version {built.version} is older than the {keep} newest published ones; "
                "it would be removed right away (raise --keep)"
            )
        gone = [n for n in index if version_of(n, built.image_id) in dropped]
        for name in gone:
            del index[name]
        write_index(update_dir, index, sign)
        for name in gone:
            with contextlib.suppress(FileNotFoundError):
                (update_dir / name).unlink()
        fsync_path(update_dir)
        # Only now, with the new index in place: chunks that no listed index names (of the
        # versions just dropped, or left by an interrupted run) go.
        result.gc = collect_garbage(update_dir, index_names(set(index)))
        result.removed_versions = dropped
        result.versions = [v for v in versions if v not in dropped]
    return result


def write_index(update_dir: Path, entries: dict[str, str], sign: Signer | None) -> None:
    """Replace SHA256SUMS atomically; with `sign`, its signature goes into place just before."""
    with atomic_file(update_dir / INDEX) as tmp:
        with tmp.open("w") as f:
            f.write(format_sha256sums(entries))
        if sign is not None:
            sig_tmp = tmp.with_name(tmp.name + ".gpg")
            try:
                sign(tmp)
                if not sig_tmp.is_file():
                    raise ParticleError(f"the signer did not write {sig_tmp.name}")
                fsync_path(sig_tmp)
                os.replace(sig_tmp, update_dir / SIGNATURE)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    sig_tmp.unlink()


def _copy(src: Path, dest: Path, published: str | None, expected: str | None) -> str:
    """Copy `src` to `dest` atomically, hashing on the way; returns the digest. A file already
    published under that name must be identical: a version is never changed once served."""
    if published is not None and dest.is_file():
        digest = sha256_file(src)
        if digest != published:
            raise ParticleError(
                f"{dest.name} is already published with different content: a version must "
                "not change once machines may have it; build a new version"
            )
        return digest
    h = hashlib.sha256()
    with atomic_file(dest) as tmp, src.open("rb") as fin, tmp.open("wb") as fout:
        while chunk := fin.read(1 << 20):
            h.update(chunk)
            fout.write(chunk)
        os.fchmod(fout.fileno(), 0o644)
        digest = h.hexdigest()
        if expected is not None and digest != expected:
            raise ParticleError(
                f"{src}: its SHA256 does not match the build's SHA256SUMS (corrupted output?)"
            )
    return digest


@contextlib.contextmanager
def _locked(update_dir: Path) -> Iterator[None]:
    """One publisher at a time per directory (two would each write an index without the
    other's files)."""
    with open(update_dir / LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
