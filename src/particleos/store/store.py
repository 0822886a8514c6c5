"""Putting files into a publish directory's chunk store, and collecting unused chunks.

Crash safety without an fsync per chunk (thousands per version): new chunks are written under
temporary names, the file system is synced once (syncfs), then they are renamed to their
digests and it is synced again; the caller writes the file's index only after that (and
SHA256SUMS after the index). So a chunk under its final name is always complete, and an
interrupted run leaves at most temporaries and chunks that no index names yet: harmless,
removed by the next collect_garbage.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ParticleError
from ..formats import (
    CHUNK_SUFFIX,
    CHUNKS_DIR,
    ChunkError,
    ChunkIndex,
    chunk_index_file,
    chunk_path,
    encode_chunk,
)
from .chunker import CDC_DEFAULT, CDC_FILESYSTEM, chunks

IN_FLIGHT = 64  # chunks being compressed at once (bounds memory: 64 x max chunk size)


def params_for(name: str) -> dict[str, Any]:
    """Chunker parameters by published file: small chunks for file system images (the usr
    image, extension images) and the verity tree (a changed data block changes 32 bytes of
    it: v1 -> v1 + htop, 0.56 MiB new at 4/16/64 KiB against 0.81 at 16/64/256), the
    default for the UKI."""
    if name.endswith(".efi"):
        return dict(CDC_DEFAULT)
    return dict(CDC_FILESYSTEM)


@dataclass
class PutStats:
    file: str
    size: int = 0
    chunks: int = 0
    new_chunks: int = 0
    new_stored_bytes: int = 0  # what this file added to the store
    stored_bytes: int = 0  # the file as stored chunks (what a machine with nothing downloads)
    seconds: float = 0.0


def _write_chunk(path: Path, data: bytes) -> tuple[Path, int]:
    """Compress one chunk into a temporary file next to `path` (zlib releases the GIL, so
    threads run in parallel); returns the temporary and the stored size."""
    blob = encode_chunk(data)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(blob)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    return tmp, len(blob)


def syncfs(path: Path) -> None:
    """Flush the file system that holds `path` (data and metadata), as syncfs(2)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs {path}: {os.strerror(err)}")
    except AttributeError:  # a libc without syncfs
        os.sync()
    finally:
        os.close(fd)


def put_file(store_root: Path, source: Path, name: str, *, params: dict[str, Any] | None = None,
             threads: int | None = None) -> tuple[ChunkIndex, PutStats]:
    """Cut `source` into chunks, store the chunks the store lacks, and return the index of the
    file published as `name` (not yet written: the caller writes it once this returns).
    `params` defaults to params_for(name)."""
    params = dict(params or params_for(name))
    started = time.monotonic()
    stats = PutStats(name)
    whole = hashlib.sha256()
    entries: list[list[Any]] = []  # [digest, size, stored size or None until written]
    pending: dict[str, list[list[Any]]] = {}  # digest -> entries waiting for its stored size
    futures: deque[tuple[str, Future[tuple[Path, int]]]] = deque()
    dirs: set[Path] = set()
    written: list[tuple[Path, Path]] = []  # (temporary, final name)

    known: dict[str, int] = {}  # digest -> stored size, of chunks this run wrote

    def settle(digest: str, fut: Future[tuple[Path, int]]) -> None:
        tmp, stored = fut.result()
        written.append((tmp, chunk_path(store_root, digest)))
        stats.new_stored_bytes += stored
        known[digest] = stored
        for entry in pending.pop(digest):
            entry[2] = stored

    workers = threads or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for chunk in chunks(source, params):
            whole.update(chunk.data)
            entry: list[Any] = [chunk.digest, len(chunk.data), None]
            entries.append(entry)
            stats.size += len(chunk.data)
            if chunk.digest in pending:
                pending[chunk.digest].append(entry)
                continue
            if chunk.digest in known:  # written earlier in this run, not yet renamed
                entry[2] = known[chunk.digest]
                continue
            path = chunk_path(store_root, chunk.digest)
            try:
                entry[2] = path.stat().st_size
                continue
            except FileNotFoundError:
                pass
            if path.parent not in dirs:
                path.parent.mkdir(parents=True, exist_ok=True)
                dirs.add(path.parent)
            pending[chunk.digest] = [entry]
            stats.new_chunks += 1
            futures.append((chunk.digest, pool.submit(_write_chunk, path, chunk.data)))
            while len(futures) > IN_FLIGHT:
                settle(*futures.popleft())
        while futures:
            settle(*futures.popleft())
    if written:
        syncfs(store_root)  # the chunks' bytes are on disk before any gets its final name
        for tmp, final in written:
            os.replace(tmp, final)
        syncfs(store_root)  # and the names before the caller writes an index naming them
    index = ChunkIndex(file=name, size=stats.size, sha256=whole.hexdigest(), chunker=params,
                       chunks=[(e[0], e[1], e[2]) for e in entries])
    stats.chunks = len(entries)
    stats.stored_bytes = sum(e[2] for e in entries)
    stats.seconds = time.monotonic() - started
    return index, stats


@dataclass
class GcStats:
    kept: int = 0
    removed: int = 0
    removed_bytes: int = 0


def live_chunks(store_root: Path, index_names: list[str]) -> set[str]:
    """Every chunk the named indexes (those SHA256SUMS lists) need. An index that cannot be
    read stops the collection: never delete what a version might need."""
    live: set[str] = set()
    for name in index_names:
        try:
            live |= ChunkIndex.read(store_root / name).digests()
        except (OSError, ChunkError) as e:
            raise ParticleError(f"{name}: cannot read this chunk index ({e}); no chunk was "
                                "removed") from None
    return live


def collect_garbage(store_root: Path, index_names: list[str]) -> GcStats:
    """Remove every chunk (and leftover temporary) that none of `index_names` needs. Run it
    under the publish lock, after the new SHA256SUMS is in place."""
    live = live_chunks(store_root, index_names)
    stats = GcStats()
    top = store_root / CHUNKS_DIR
    if not top.is_dir():
        return stats
    for sub in sorted(top.iterdir()):
        if not sub.is_dir():
            continue
        for f in sub.iterdir():
            digest = f.name.removesuffix(CHUNK_SUFFIX)
            if f.name.endswith(CHUNK_SUFFIX) and digest in live:
                stats.kept += 1
                continue
            with contextlib.suppress(FileNotFoundError):
                size = f.stat().st_size
                f.unlink()
                stats.removed += 1
                stats.removed_bytes += size
        with contextlib.suppress(OSError):
            sub.rmdir()  # only when empty
    return stats


def index_names(names: list[str] | set[str]) -> list[str]:
    """The chunk indexes among published names."""
    return sorted(n for n in names if chunk_index_file(n))
