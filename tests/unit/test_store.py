"""The chunk store of `particle publish` (delta updates): FastCDC boundaries and their
stability, the chunk index format, reconstruction from seeds, garbage collection across
versions, the publish lock, and what an interrupted publish leaves behind."""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import random
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from particleos.errors import ParticleError
from particleos.formats import (
    ChunkError,
    ChunkIndex,
    chunk_index_file,
    chunk_path,
    decode_chunk,
    encode_chunk,
    format_sha256sums,
    read_sha256sums,
)
from particleos.machine import delta as machine_delta
from particleos.store.chunker import CDC_DEFAULT, CDC_FILESYSTEM, cdc_cuts, chunks, cut_sizes
from particleos.store.delta import delta
from particleos.store.store import put_file
from particleos.update import publish as pub

from .conftest import Run

ID = "demo"
MiB = 1 << 20


def data(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def digests(blob: bytes) -> list[str]:
    return [c.digest for c in chunks(blob)]


def test_cuts_are_content_defined_and_match_the_reference() -> None:
    base = data(1, 3 * MiB)
    # The compiled chunker and the plain-Python one a machine could use cut identically.
    assert cut_sizes(base) == cdc_cuts(base)
    assert cut_sizes(base[:MiB], CDC_FILESYSTEM) == cdc_cuts(base[:MiB], CDC_FILESYSTEM)
    sizes = cut_sizes(base)
    assert sum(sizes) == len(base)
    assert all(CDC_DEFAULT["min"] <= s <= CDC_DEFAULT["max"] for s in sizes[:-1])
    # An insertion shifts everything after it, yet only the chunks around it change.
    shifted = base[: MiB + 123] + data(2, 777) + base[MiB + 123 :]
    old, new = digests(base), digests(shifted)
    assert len(set(new) - set(old)) <= 2
    assert len(set(old) - set(new)) <= 2
    assert len(old) > 20
    # So does a deletion at the front.
    assert len(set(digests(base[5000:])) - set(old)) <= 2


def make_index(blob: bytes, name: str = "f.raw") -> ChunkIndex:
    entries = [(c.digest, len(c.data), len(encode_chunk(c.data))) for c in chunks(blob)]
    return ChunkIndex(name, len(blob), hashlib.sha256(blob).hexdigest(), dict(CDC_DEFAULT),
                      entries)


def test_index_round_trip_and_validation() -> None:
    index = make_index(data(3, MiB))
    raw = index.to_bytes()
    again = ChunkIndex.from_bytes(raw)
    assert again == index and again.to_bytes() == raw
    obj = json.loads(raw)
    assert obj["format"] == 1 and obj["file"] == "f.raw" and obj["size"] == MiB
    assert [o for _, o, _ in index.offsets()][:2] == [0, index.chunks[0][1]]

    def broken(**change: object) -> bytes:
        return json.dumps({**obj, **change}).encode()

    first = obj["chunks"][0]
    for bad, why in [
        (b"not json", "not JSON"),
        (b"[]", "not a JSON object"),
        (broken(format=2), "format 2"),
        (broken(size=MiB + 1), "add up to"),
        (broken(sha256="xyz"), "bad sha256"),
        (broken(file="../etc/passwd"), "bad file name"),
        (broken(chunks=[["AB" * 32, *first[1:]], *obj["chunks"][1:]]), "bad chunk digest"),
        (broken(chunks=[[first[0], 0, 1], *obj["chunks"][1:]]), "size 0"),
        (broken(chunks=[first[:2], *obj["chunks"][1:]]), "malformed"),
    ]:
        with pytest.raises(ChunkError, match=why):
            ChunkIndex.from_bytes(bad)


def test_decode_chunk_checks_digest_and_size() -> None:
    payload = data(4, 70000)
    digest = hashlib.sha256(payload).hexdigest()
    assert decode_chunk(encode_chunk(payload), digest, len(payload)) == payload
    with pytest.raises(ChunkError, match="digest mismatch"):
        decode_chunk(encode_chunk(payload[:-1] + b"!"), digest, len(payload))
    with pytest.raises(ChunkError):
        decode_chunk(encode_chunk(payload)[:-5], digest, len(payload))
    with pytest.raises(ChunkError, match="not a"):
        decode_chunk(encode_chunk(payload + b"more"), digest, len(payload))


def reconstruct(index: ChunkIndex, out: io.BytesIO, seeds: list[tuple[Path, ChunkIndex]],
                 fetch: Callable[[str], bytes]) -> machine_delta.Result:
    """Rebuild the file `index` describes into `out` as a machine does (machine.delta): seed
    chunks where their bytes match, the others through `fetch(digest) -> stored bytes`."""
    def fetch_chunks(missing: list[tuple[str, int, int]]) -> Iterator[tuple[str, bytes]]:
        for digest, size, _ in missing:
            yield digest, decode_chunk(fetch(digest), digest, size)

    locations = machine_delta.seed_locations(
        [machine_delta.Seed(str(path), seed_index, path.name) for path, seed_index in seeds])
    with tempfile.TemporaryDirectory() as tmp:
        dest = Path(tmp) / index.file
        result = machine_delta.reconstruct(index, index.sha256, dest, locations, fetch_chunks,
                                           lambda _: None)
        out.write(dest.read_bytes())
    return result


def test_reconstruct_from_a_seed_fetches_only_the_new_chunks(tmp_path: Path) -> None:
    old = data(5, 2 * MiB)
    new = old[:700_000] + data(6, 5000) + old[700_000:]
    store = tmp_path / "srv"
    (tmp_path / "old.raw").write_bytes(old)
    (tmp_path / "new.raw").write_bytes(new)
    old_index, _ = put_file(store, tmp_path / "old.raw", "old.raw")
    new_index, stats = put_file(store, tmp_path / "new.raw", "new.raw")
    assert stats.new_chunks <= 2 and stats.new_stored_bytes == sum(
        chunk_path(store, d).stat().st_size for d in new_index.digests() - set(
            machine_delta.seed_locations([machine_delta.Seed(str(tmp_path / "old.raw"),
                                                             old_index, "old")])))
    fetched: list[str] = []

    def fetch(digest: str) -> bytes:
        fetched.append(digest)
        return chunk_path(store, digest).read_bytes()

    out = io.BytesIO()
    result = reconstruct(new_index, out, [(tmp_path / "old.raw", old_index)], fetch)
    assert out.getvalue() == new
    assert len(fetched) <= 2 and result.local >= len(new) - 300_000
    # A seed whose bytes are not what its index says is not trusted: those chunks are fetched.
    (tmp_path / "old.raw").write_bytes(b"\0" * len(old))
    out = io.BytesIO()
    result = reconstruct(new_index, out, [(tmp_path / "old.raw", old_index)], fetch)
    assert out.getvalue() == new and result.local == 0
    # A stored chunk that does not match its digest stops the reconstruction.
    victim = new_index.chunks[3][0]
    chunk_path(store, victim).write_bytes(encode_chunk(b"evil"))
    with pytest.raises(ChunkError, match=victim):
        reconstruct(new_index, io.BytesIO(), [], fetch)


def fake_build(out: Path, version: str, usr: bytes, uki: bytes) -> Path:
    """A build output directory as `particle build` leaves it, with images big enough to be
    cut into many chunks."""
    out.mkdir(parents=True, exist_ok=True)
    rh = hashlib.sha256(usr).digest()
    stem = f"{ID}_{version}"
    files = {
        f"{stem}.usr.raw": usr,
        f"{stem}.usr-verity.raw": hashlib.sha256(usr).digest() * 100,
        f"{stem}.efi": uki,
        f"{stem}.manifest.json": json.dumps({"id": ID, "version": version,
                                             "root_hash": rh.hex()}).encode(),
    }
    for name, blob in files.items():
        (out / name).write_bytes(blob)
    sums = read_sha256sums(out / "SHA256SUMS")
    sums.update({n: hashlib.sha256(b).hexdigest() for n, b in files.items()})
    (out / "SHA256SUMS").write_text(format_sha256sums(sums))
    return out


BASE = data(7, 3 * MiB)
UKI = data(8, MiB)


def version_usr(v: int) -> bytes:
    """Each version inserts a few KiB at its own place: mostly shared with the last."""
    usr = BASE
    for i in range(1, v + 1):
        at = i * 400_000
        usr = usr[:at] + data(100 + i, 3000) + usr[at:]
    return usr


def listed_chunks(srv: Path) -> set[str]:
    need: set[str] = set()
    for name in read_sha256sums(srv / "SHA256SUMS"):
        if chunk_index_file(name):
            index = ChunkIndex.read(srv / name)
            assert hashlib.sha256((srv / name).read_bytes()).hexdigest() == read_sha256sums(
                srv / "SHA256SUMS")[name]
            need |= index.digests()
    return need


def stored_chunks(srv: Path) -> set[str]:
    return {p.name.removesuffix(".zz") for p in (srv / "chunks").glob("*/*")}


def test_publish_stores_chunks_and_gc_keeps_what_kept_versions_need(tmp_path: Path) -> None:
    srv = tmp_path / "srv"
    results = [pub.publish(fake_build(tmp_path / f"b{v}", str(v), version_usr(v), UKI), srv,
                           keep=2) for v in (1, 2, 3)]
    # The UKI is unchanged: v2 and v3 add only the chunks around their insertion.
    assert results[0].chunked and all(len(r.chunked) == 3 for r in results)
    assert sum(s.new_chunks for s in results[2].chunked if s.file.endswith(".efi")) == 0
    added = sum(s.new_stored_bytes for s in results[2].chunked)
    assert added < results[2].update_bytes * 0.2
    # v1 is gone with its indexes; every chunk v2 and v3 name is there, and nothing else.
    assert results[2].removed_versions == ["1"]
    assert not [n for n in read_sha256sums(srv / "SHA256SUMS") if n.startswith("demo_1")]
    assert results[2].gc is not None and results[2].gc.removed >= 1
    assert stored_chunks(srv) == listed_chunks(srv)
    # Both kept versions rebuild from the store alone.
    for name in read_sha256sums(srv / "SHA256SUMS"):
        if chunk_index_file(name):
            index = ChunkIndex.read(srv / name)
            out = io.BytesIO()
            reconstruct(index, out, [], lambda d: chunk_path(srv, d).read_bytes())
            assert out.getvalue() == (srv / index.file).read_bytes()
    # File system images are cut finer than the UKI.
    sums = read_sha256sums(srv / "SHA256SUMS")
    usr_index = next(n for n in sums if n.endswith(".usr.raw.json"))
    assert ChunkIndex.read(srv / usr_index).chunker == CDC_FILESYSTEM
    assert ChunkIndex.read(srv / "chunks.demo_3.efi.json").chunker == CDC_DEFAULT
    d = delta(srv, ID, "2", "3")
    assert d.chunk_bytes < d.full_bytes * 0.1 and d.delta_bytes > d.chunk_bytes


def test_no_chunks_and_an_unreadable_index_keeps_every_chunk(tmp_path: Path) -> None:
    srv = tmp_path / "srv"
    pub.publish(fake_build(tmp_path / "b1", "1", version_usr(1), UKI), srv)
    before = stored_chunks(srv)
    r = pub.publish(fake_build(tmp_path / "b2", "2", version_usr(2), UKI), srv, chunks=False)
    assert not r.chunked and not any(n.startswith("chunks.demo_2")
                                     for n in read_sha256sums(srv / "SHA256SUMS"))
    assert stored_chunks(srv) == before  # v1's chunks are still needed
    # An index the collector cannot read stops it before it removes anything.
    name = next(n for n in read_sha256sums(srv / "SHA256SUMS") if n.endswith("usr.raw.json"))
    (srv / name).write_text("garbage")
    with pytest.raises(ParticleError, match="no chunk was removed"):
        pub.publish(fake_build(tmp_path / "b3", "3", version_usr(3), UKI), srv)
    assert before <= stored_chunks(srv)


def test_publish_waits_for_the_lock_and_concurrent_runs_lose_nothing(tmp_path: Path) -> None:
    srv = tmp_path / "srv"
    srv.mkdir()
    builds = {v: fake_build(tmp_path / f"b{v}", str(v), version_usr(v), UKI) for v in (1, 2, 3)}
    with open(srv / pub.LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        t = threading.Thread(target=pub.publish, args=(builds[1], srv))
        t.start()
        t.join(0.5)
        assert t.is_alive()  # blocked on the lock another publisher holds
        assert not (srv / "chunks").exists() and not (srv / "SHA256SUMS").exists()
        fcntl.flock(lock, fcntl.LOCK_UN)
    t.join()
    # Two publishers at once (one of them collecting garbage with --keep): both versions end
    # up listed and complete.
    errors: list[BaseException] = []

    def run(v: int, keep: int | None) -> None:
        try:
            pub.publish(builds[v], srv, keep=keep)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(2, None)),
               threading.Thread(target=run, args=(3, 2))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    versions = {pub.version_of(n, ID) for n in read_sha256sums(srv / "SHA256SUMS")}
    assert {"2", "3"} <= versions
    assert listed_chunks(srv) <= stored_chunks(srv)


KILLER = """
import os, signal, sys
from pathlib import Path
from particleos.store import store
from particleos.update import publish as pub
real, count = store._write_chunk, [0]
def write_then_die(path, data):
    count[0] += 1
    if count[0] > int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)  # power loss: nothing is cleaned up
    return real(path, data)
store._write_chunk = write_then_die
pub.publish(Path(sys.argv[1]), Path(sys.argv[2]))
"""


def test_killed_publish_leaves_a_consistent_store(tmp_path: Path, repo: Path) -> None:
    srv = tmp_path / "srv"
    pub.publish(fake_build(tmp_path / "b1", "1", version_usr(1), UKI), srv)
    sums = (srv / "SHA256SUMS").read_bytes()
    # v2 brings a new UKI (16 new chunks); killed after 5 of them were written.
    b2 = fake_build(tmp_path / "b2", "2", version_usr(2), data(9, MiB))
    proc = subprocess.run([sys.executable, "-c", KILLER, str(b2), str(srv), "5"],
                          cwd=repo, check=False, capture_output=True)
    assert proc.returncode == -9, proc.stderr
    # What machines read is unchanged, and complete; the extra chunks are orphans.
    assert (srv / "SHA256SUMS").read_bytes() == sums
    assert listed_chunks(srv) <= stored_chunks(srv)
    orphans = stored_chunks(srv) - listed_chunks(srv)
    assert orphans
    # The next publish completes v2 and collects what no listed index names.
    pub.publish(b2, srv)
    assert stored_chunks(srv) == listed_chunks(srv)
    assert not [p for p in srv.rglob("*") if ".tmp-" in p.name]
    assert "chunks.demo_2.efi.json" in read_sha256sums(srv / "SHA256SUMS")


def test_a_chunk_repeated_within_a_file_is_stored_once(tmp_path: Path) -> None:
    # The same MiB at the start and after 3 MiB (more chunks than are compressed at once).
    block = data(10, MiB)
    blob = block + data(11, 3 * MiB) + block + b"\0" * MiB
    (tmp_path / "f.raw").write_bytes(blob)
    index, stats = put_file(tmp_path / "srv", tmp_path / "f.raw", "f.raw")
    assert stats.new_chunks == len(index.digests()) < len(index.chunks)
    assert stored_chunks(tmp_path / "srv") == index.digests()
    assert stats.new_stored_bytes == sum(chunk_path(tmp_path / "srv", d).stat().st_size
                                         for d in index.digests())
    out = io.BytesIO()
    reconstruct(index, out, [], lambda d: chunk_path(tmp_path / "srv", d).read_bytes())
    assert out.getvalue() == blob
    assert not [p for p in (tmp_path / "srv").rglob("*") if ".tmp-" in p.name]


def test_publish_cli_prints_the_delta_from_the_previous_version(tmp_path: Path, run: Run
                                                                ) -> None:
    srv = tmp_path / "srv"
    pub.publish(fake_build(tmp_path / "b1", "1", version_usr(1), UKI), srv)
    code, out, _ = run("publish", str(fake_build(tmp_path / "b2", "2", version_usr(2), UKI)),
                       str(srv))
    assert code == 0, out
    d = delta(srv, ID, "1", "2")
    assert "chunks: " in out and "delta from 1: " in out
    percent = float(out.split("delta from 1: ")[1].split("(")[1].split(" %")[0])
    assert percent == round(100 * d.ratio, 1) and percent < 20


def test_no_sysupdate_pattern_takes_an_index_for_an_image(tmp_path: Path) -> None:
    """systemd-sysupdate 257 matches a source pattern as a prefix (what follows it is
    ignored): `ID_@v.efi` took `ID_V.efi.chunks` for the UKI. Index names must match none."""
    import re

    from particleos.update.transfer import transfer_files

    srv = tmp_path / "srv"
    pub.publish(fake_build(tmp_path / "b1", "1", version_usr(1), UKI), srv)
    names = set(read_sha256sums(srv / "SHA256SUMS"))
    patterns = []
    for text in transfer_files(ID, "http://10.0.2.100/", 3).values():
        source = text.split("[Source]", 1)[1].split("[Target]", 1)[0]
        patterns += re.findall(r"^MatchPattern=(.+)$", source, re.M)
    assert len(patterns) == 3

    def prefix_match(pattern: str, name: str) -> bool:
        parts = [re.escape(p) for p in re.split(r"@[a-zA-Z]", pattern)]
        return re.match(".+?".join(parts), name) is not None  # no end anchor, as 257

    indexes = {n for n in names if chunk_index_file(n)}
    assert len(indexes) == 3
    for pattern in patterns:
        assert [n for n in names - indexes if prefix_match(pattern, n)]  # the image matches
        assert not [n for n in indexes if prefix_match(pattern, n)], pattern
        # The old naming would have been taken for the image.
        assert [f"{n}.chunks" for n in names - indexes if prefix_match(pattern, f"{n}.chunks")]
