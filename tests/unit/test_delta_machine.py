"""The machine side of delta updates (`particleos.machine.delta`) on real files: a version is
rebuilt from seed files plus chunks fetched with curl from a store in a directory (file://,
the same curl invocation as over http), and every way the delta can fail raises DeltaError
before anything is in place, so `particle update` falls back to the full download."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest

from particleos import formats, openpgp
from particleos.formats import ChunkIndex, chunk_index_name, chunk_path, encode_chunk
from particleos.machine import delta, update
from particleos.machine.cli import MachineError
from particleos.store.chunker import CDC_DEFAULT, cdc_cuts

ID = "demo"
needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")


def index_of(name: str, data: bytes) -> ChunkIndex:
    """What the publisher writes for `data` (the reference chunker, the store's format)."""
    chunks, off = [], 0
    for size in cdc_cuts(data):
        piece = data[off : off + size]
        chunks.append((formats.hashlib.sha256(piece).hexdigest(), size, len(encode_chunk(piece))))
        off += size
    return ChunkIndex(name, len(data), formats.hashlib.sha256(data).hexdigest(),
                      dict(CDC_DEFAULT), chunks)


def store(root: Path, name: str, data: bytes) -> ChunkIndex:
    """Publish `data` as `name` with its chunks and index (what `particle publish` does)."""
    index = index_of(name, data)
    off = 0
    for digest, size, _ in index.chunks:
        path = chunk_path(root, digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_chunk(data[off : off + size]))
        off += size
    (root / name).write_bytes(data)
    (root / chunk_index_name(name)).write_bytes(index.to_bytes())
    return index


def versions() -> tuple[bytes, bytes]:
    """v1 and v2 = v1 with 3 KiB inserted and 100 bytes changed near the end (1.5 MiB)."""
    rnd = random.Random(11)
    v1 = rnd.randbytes(1536 << 10)
    v2 = v1[:400_000] + rnd.randbytes(3072) + v1[400_000:1_400_000] + b"x" * 100 + \
        v1[1_400_100:]
    return v1, v2


@pytest.fixture
def published(tmp_path: Path) -> tuple[Path, Path, ChunkIndex, ChunkIndex, bytes]:
    """(store dir, v1 seed file, v1 index, v2 index, v2 bytes)."""
    v1, v2 = versions()
    srv = tmp_path / "srv"
    srv.mkdir()
    i1 = store(srv, f"{ID}_1.usr.raw", v1)
    i2 = store(srv, f"{ID}_2.usr.raw", v2)
    seed = tmp_path / "slot-a"
    seed.write_bytes(v1 + bytes(1 << 20))  # a slot is larger than the image it holds
    return srv, seed, i1, i2, v2


@needs_curl
def test_reconstruct_takes_seed_chunks_and_fetches_only_the_rest(
    tmp_path: Path, published: tuple[Path, Path, ChunkIndex, ChunkIndex, bytes]
) -> None:
    srv, seed, i1, i2, v2 = published
    said: list[str] = []
    locations = delta.seed_locations([delta.Seed(str(seed), i1, "slot A (1)")])
    new_chunks = i2.digests() - i1.digests()
    assert 0 < len(new_chunks) < len(i2.chunks) // 3  # the insertion moved only nearby cuts
    est = delta.estimate(i2, set(locations))
    assert est == sum(z for d, _, z in i2.chunks if d in new_chunks)
    work = tmp_path / "work"
    work.mkdir()
    dest = tmp_path / f"{ID}_2.usr.raw"
    result = delta.reconstruct(i2, i2.sha256, dest, locations,
                               delta.store_fetcher(delta.Source(str(srv)), work, said.append,
                                                   batch_bytes=16 << 10),
                               said.append)
    assert dest.read_bytes() == v2
    assert result.fetched_chunks == len(new_chunks) and result.bad_seeds == 0
    assert result.fetched_stored == est
    assert result.local + result.fetched == len(v2)
    assert said[0].startswith(f"{dest.name}: ") and f"{len(new_chunks)} chunks" in said[0]
    assert said[-1] == f"fetched {delta.mib(est)} of {delta.mib(est)}"
    assert len(said) > 2  # progress after each batch
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["srv", "slot-a", "work", dest.name])  # no temporary left
    assert list(work.iterdir()) == []


@needs_curl
def test_a_seed_chunk_that_fails_its_digest_is_fetched_instead(
    tmp_path: Path, published: tuple[Path, Path, ChunkIndex, ChunkIndex, bytes]
) -> None:
    srv, seed, i1, i2, v2 = published
    with seed.open("r+b") as f:  # the slot's bytes are not what v1's index says
        f.seek(10)
        f.write(b"rot")
    locations = delta.seed_locations([delta.Seed(str(seed), i1, "slot A")])
    work = tmp_path / "w"
    work.mkdir()
    result = delta.reconstruct(i2, i2.sha256, tmp_path / "out", locations,
                               delta.store_fetcher(delta.Source(str(srv)), work, print), print)
    assert (tmp_path / "out").read_bytes() == v2
    assert result.bad_seeds == 1
    assert result.fetched_chunks == len(i2.digests() - i1.digests()) + 1


@needs_curl
@pytest.mark.parametrize("damage", ["corrupt chunk", "store missing", "wrong index"])
def test_every_delta_failure_raises_and_leaves_nothing(
    tmp_path: Path, published: tuple[Path, Path, ChunkIndex, ChunkIndex, bytes], damage: str
) -> None:
    srv, seed, i1, i2, _ = published
    missing = sorted(i2.digests() - i1.digests())
    want = i2.sha256
    if damage == "corrupt chunk":
        path = chunk_path(srv, missing[0])
        raw = bytearray(path.read_bytes())
        raw[-5] ^= 0xFF
        path.write_bytes(bytes(raw))
        match = r"chunk [0-9a-f]{12}\.\.\. from the store is corrupt"
    elif damage == "store missing":
        shutil.rmtree(srv / "chunks")
        match = "could not fetch chunks/"
    else:
        want = "0" * 64  # SHA256SUMS lists another file than the index describes
        match = "describes another file"
    work = tmp_path / "w"
    work.mkdir()
    dest = tmp_path / "out"
    with pytest.raises(delta.DeltaError, match=match):
        delta.reconstruct(i2, want, dest, delta.seed_locations([delta.Seed(str(seed), i1, "A")]),
                          delta.store_fetcher(delta.Source(str(srv)), work, print), print)
    assert not dest.exists()
    assert not any(p.name.endswith(".part") for p in tmp_path.iterdir())


def test_versions_and_parts_from_sha256sums() -> None:
    uuid = "0123abcd-0123-4567-89ab-0123456789ab"
    names = [f"{ID}_1.0_{uuid}.usr.raw", f"{ID}_1.0_{uuid}.usr-verity.raw", f"{ID}_1.0.efi",
             chunk_index_name(f"{ID}_1.0.efi"),
             f"{ID}_1.0.manifest.json",
             f"{ID}_1.10_{uuid}.usr.raw", f"{ID}_1.10.efi",  # incomplete: no hash tree
             f"{ID}_1.9_{uuid}.usr.raw", f"{ID}_1.9_{uuid}.usr-verity.raw", f"{ID}_1.9.efi",
             "other_2.0.efi"]
    sums = {n: "0" * 64 for n in names}
    found = delta.newest(sums, ID, signed=False)
    assert found is not None and found[0] == "1.9"  # 1.10 is newer but not complete
    assert found[1] == {".usr.raw": f"{ID}_1.9_{uuid}.usr.raw",
                        ".usr-verity.raw": f"{ID}_1.9_{uuid}.usr-verity.raw",
                        ".efi": f"{ID}_1.9.efi"}
    assert delta.newest(sums, ID, signed=True) is None  # no usr-verity-sig published


def test_running_packages_from_the_factory_dpkg_status() -> None:
    text = ("Package: less\nStatus: install ok installed\nVersion: 668-1\nDescription: x\n"
            " continued: line\n\nPackage: gone\nStatus: deinstall ok config-files\n"
            "Version: 1\n\nPackage: htop\nStatus: install ok installed\nVersion: 3.4.1-5\n")
    assert delta.packages_from_dpkg_status(text) == {"less": "668-1", "htop": "3.4.1-5"}


@pytest.fixture
def machine_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    state = tmp_path / "var-lib-particle"
    monkeypatch.setattr(delta, "INCOMING", state / "incoming")
    monkeypatch.setattr(delta, "KEPT", state / "chunks")
    return state


def publish_version(srv: Path, version: str, usr: bytes, uki: bytes) -> dict[str, str]:
    """A version as `particle publish` serves it, SHA256SUMS rewritten."""
    uuid = "0123abcd-0123-4567-89ab-0123456789ab"
    store(srv, f"{ID}_{version}_{uuid}.usr.raw", usr)
    store(srv, f"{ID}_{version}.efi", uki)
    (srv / f"{ID}_{version}_{uuid}.usr-verity.raw").write_bytes(version.encode() * 1000)
    (srv / f"{ID}_{version}.manifest.json").write_text(formats.Manifest(
        ID, version, "trixie", "x86-64", "6.12", "erofs", "ab" * 32,
        packages={"less": "1", **({"htop": "3"} if version == "2" else {})}).to_json())
    sums = {p.name: formats.sha256_file(p) for p in srv.iterdir() if p.is_file()
            and p.name != formats.SHA256SUMS and not p.name.endswith(".gpg")}
    (srv / formats.SHA256SUMS).write_text(formats.format_sha256sums(sums))
    return sums


@needs_curl
def test_stage_rebuilds_a_version_in_incoming_and_keeps_its_indexes(
    tmp_path: Path, machine_dirs: Path
) -> None:
    v1, v2 = versions()
    uki1, uki2 = v1[:300_000], v1[:150_000] + b"new cmdline" + v1[150_000:300_000]
    srv = tmp_path / "srv"
    srv.mkdir()
    publish_version(srv, "1", v1, uki1)
    publish_version(srv, "2", v2, uki2)
    slot, esp_uki = tmp_path / "slot", tmp_path / "uki.efi"
    slot.write_bytes(v1 + bytes(4096))
    esp_uki.write_bytes(uki1)
    uuid = "0123abcd-0123-4567-89ab-0123456789ab"
    held = [delta.Held(f"{ID}_1_{uuid}.usr.raw", str(slot), "slot A (1)"),
            delta.Held(f"{ID}_1.efi", str(esp_uki), "UKI 1")]
    source = delta.Source(str(srv))
    delta.clean_incoming()
    work = delta.INCOMING / ".work"
    work.mkdir()
    o = delta.offer(source, ID, "1", verify=False, signed=False, work=work)
    assert o is not None and o.version == "2"
    assert delta.offer(source, ID, "2", verify=False, signed=False, work=work) is None
    p = delta.preview(o, source, held, work)
    assert p.full == len(v2) + len(uki2) + 1000
    assert p.seeds == ["slot A (1)", "UKI 1"]
    said: list[str] = []
    staged = delta.stage(o, source, held, said.append)
    for suffix, data in ((".usr.raw", v2), (".efi", uki2)):
        assert (delta.INCOMING / o.files[suffix]).read_bytes() == data
    assert (delta.INCOMING / o.files[".usr-verity.raw"]).read_bytes() == b"2" * 1000
    assert staged.full == p.full and staged.fetched < staged.full // 4
    assert p.delta == staged.fetched  # the preview said what the update then downloaded
    assert set(staged.keep) == {chunk_index_name(o.files[".usr.raw"]),
                                chunk_index_name(o.files[".efi"]), f"{ID}_2.manifest.json"}
    assert said[0].startswith("delta update to 2: seeds slot A (1), UKI 1")
    # The seeds' indexes came from the source and are kept for the next update.
    assert sorted(p.name for p in delta.KEPT.iterdir()) == sorted(
        chunk_index_name(h.name) for h in held)
    delta.prune_kept({"2"}, ID)
    assert list(delta.KEPT.iterdir()) == []


def test_kept_files_are_pruned_by_their_exact_version(machine_dirs: Path) -> None:
    uuid = "0123abcd-0123-4567-89ab-0123456789ab"
    names = [chunk_index_name(f"{ID}_2.0.1_{uuid}.usr.raw"), chunk_index_name(f"{ID}_2.0.1.efi"),
             chunk_index_name(f"{ID}_2.0.1_{uuid}.usr-verity.raw"), f"{ID}_2.0.1.manifest.json",
             chunk_index_name(f"{ID}_2.0.12.efi"), f"{ID}_2.0.2.manifest.json",
             chunk_index_name(f"{ID}_2.0.2.efi")]
    for n in names:
        delta.keep_file(n, b"{}")
    delta.prune_kept({"2.0.2", "2.0.3"}, ID)
    assert sorted(p.name for p in delta.KEPT.iterdir()) == sorted(
        [chunk_index_name(f"{ID}_2.0.2.efi"), f"{ID}_2.0.2.manifest.json"])


@pytest.mark.skipif(shutil.which("gpg") is None, reason="gnupg not installed")
@needs_curl
def test_the_index_signature_is_checked_against_the_machine_keyring(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    srv = tmp_path / "srv"
    srv.mkdir()
    (srv / formats.SHA256SUMS).write_text(formats.format_sha256sums({f"{ID}_1.efi": "1" * 64}))
    secret, public = openpgp.generate("Owner <o@example.org>")
    _, stranger = openpgp.generate("Stranger <s@example.org>")
    (tmp_path / "owner.asc").write_bytes(secret)
    openpgp.sign_detached(tmp_path / "owner.asc", srv / formats.SHA256SUMS)
    keyring = tmp_path / "import-pubring.gpg"
    monkeypatch.setattr(delta, "KEYRINGS", (tmp_path / "none.gpg", keyring))
    work = tmp_path / "w"
    work.mkdir()
    keyring.write_bytes(public)
    assert delta.read_published(delta.Source(str(srv)), work, verify=True) == {
        f"{ID}_1.efi": "1" * 64}
    keyring.write_bytes(stranger)
    with pytest.raises(delta.DeltaError, match="does not verify"):
        delta.read_published(delta.Source(str(srv)), work, verify=True)
    (srv / "SHA256SUMS.gpg").unlink()
    keyring.write_bytes(public)
    with pytest.raises(delta.DeltaError, match=r"could not fetch SHA256SUMS\.gpg"):
        delta.read_published(delta.Source(str(srv)), work, verify=True)


def test_update_falls_back_to_the_full_download_when_the_delta_fails(
    tmp_path: Path, machine_dirs: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str]
) -> None:
    """install_by_delta says why in one line, leaves INCOMING empty and returns False, so
    cmd_update runs sysupdate's own download; a failed install from INCOMING falls back too."""
    o = delta.Offer("2", {".usr.raw": f"{ID}_2_u.usr.raw"},
                    {f"{ID}_2_u.usr.raw": "0" * 64,
                     chunk_index_name(f"{ID}_2_u.usr.raw"): "1" * 64})
    monkeypatch.setattr(update, "_delta_setup", lambda source: (delta.Source(source), ID,
                                                                False, False))
    monkeypatch.setattr(delta, "offer", lambda *a, **k: o)
    monkeypatch.setattr(update, "_entries", lambda: (tmp_path, []))
    monkeypatch.setattr(update, "_held", lambda image_id: [])
    monkeypatch.setattr(update, "_extension_transfers", lambda: False)

    def broken_stage(*args: object) -> delta.Staged:
        (delta.INCOMING / "half.part").write_bytes(b"x")
        raise delta.DeltaError("chunk 0123... of demo_2_u.usr.raw fails its digest")

    monkeypatch.setattr(delta, "stage", broken_stage)
    assert update.install_by_delta("1", "/nowhere") is False
    out = capsys.readouterr().out
    assert out == ("delta update not possible: chunk 0123... of demo_2_u.usr.raw fails its "
                   "digest; falling back to the full download\n")
    assert list(delta.INCOMING.iterdir()) == []

    monkeypatch.setattr(delta, "stage", lambda *a: delta.Staged("2", {}, 10, 100))

    def failing_install() -> None:
        raise MachineError("systemd-sysupdate update from /var/lib/particle/incoming failed")

    monkeypatch.setattr(update, "install_local", failing_install)
    assert update.install_by_delta("1", "/nowhere") is False
    assert "falling back to the full download" in capsys.readouterr().out
    # Installed extensions have transfers the local install would not run: whole download.
    monkeypatch.setattr(update, "_extension_transfers", lambda: True)
    assert update.install_by_delta("1", "/nowhere") is False
    assert "delta updates do not cover extensions yet" in capsys.readouterr().out
    monkeypatch.setattr(update, "_extension_transfers", lambda: False)
    # A source without a store: one line, then the full download.
    monkeypatch.setattr(delta, "offer", lambda *a, **k: delta.Offer(
        "2", {".usr.raw": f"{ID}_2_u.usr.raw"}, {f"{ID}_2_u.usr.raw": "0" * 64}))
    assert update.install_by_delta("1", "/nowhere") is False
    assert capsys.readouterr().out == (
        "no chunk store at /nowhere for 2: downloading it whole\n")


def test_no_chunk_index_matches_a_sysupdate_source_pattern() -> None:
    """sysupdate 257 ignores what follows a pattern's last literal: an index named
    `ID_V.efi.chunks` was installed as the UKI by a full download (the update chain's
    fallback). Patterns start with the image id (literal), which an index name never does."""
    from particleos.update.transfer import parts, served_name, source_pattern

    uuid = "0123abcd-0123-4567-89ab-0123456789ab"
    for part in parts(verity_sig=True):
        index = chunk_index_name(served_name(ID, "2.0", part, uuid))
        assert not index.startswith(source_pattern(ID, part).split("@")[0]), index
    assert not chunk_index_name(f"{ID}-devtools_2.0.raw").startswith(f"{ID}-devtools_")
    assert formats.chunk_index_file(chunk_index_name(f"{ID}_2.0.efi")) == f"{ID}_2.0.efi"
