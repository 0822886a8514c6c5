"""Host side of A/B updates: transfer definitions, served names, `particle publish` (atomic
index, --keep, idempotence, the signing hook), version order, the loopback relay."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from particleos.builder.context import BuildContext
from particleos.builder.updates import update_definitions
from particleos.errors import ParticleError, SpecError
from particleos.formats import format_sha256sums, read_sha256sums
from particleos.machine.versions import vercmp, version_key
from particleos.spec import load_spec
from particleos.tools import ToolsTree
from particleos.update import publish as pub
from particleos.update.transfer import (
    UKI,
    USR,
    VERITY,
    boot_counted_name,
    served_name,
    transfer_files,
)
from particleos.verity import verity_uuids

RELAY = Path(__file__).resolve().parent.parent / "integration" / "relay.py"

ID = "demo"


def test_transfer_files_http_source() -> None:
    files = transfer_files(ID, "http://10.0.2.100/", 3)
    assert list(files) == ["10-usr-verity.transfer", "20-usr.transfer", "30-uki.transfer"]
    usr = files["20-usr.transfer"]
    assert "[Transfer]\nProtectVersion=%A\nVerify=no\n" in usr
    assert "Type=url-file\nPath=http://10.0.2.100/\nMatchPattern=demo_@v_@u.usr.raw\n" in usr
    assert "Type=partition\nPath=auto\nMatchPattern=demo_@v\nMatchPartitionType=usr-x86-64\n" in usr
    assert usr.endswith("InstancesMax=2\n")
    assert "MatchPartitionType=usr-x86-64-verity\n" in files["10-usr-verity.transfer"]
    uki = files["30-uki.transfer"]
    assert "MatchPattern=demo_@v.efi\n" in uki
    assert "Type=regular-file\nPath=/EFI/Linux\nPathRelativeTo=boot\n" in uki
    assert "MatchPattern=demo_@v+@l-@d.efi demo_@v+@l.efi demo_@v.efi\n" in uki
    assert "TriesLeft=3\nTriesDone=0\n" in uki


def test_transfer_files_local_directory_and_signature() -> None:
    files = transfer_files(ID, "/run/media/updates/", 1, verity_sig=True, verify=True)
    assert next(iter(files)) == "10-usr-verity-sig.transfer"
    assert list(files)[-1].endswith("-uki.transfer")
    text = files["30-usr.transfer"]
    assert "Type=regular-file\nPath=/run/media/updates\n" in text
    assert "Verify=no" in text  # sysupdate only verifies downloads
    assert "Verify=yes" in transfer_files(ID, "https://u.example/", 1, verify=True)[
        "20-usr.transfer"]


def test_served_names_carry_partition_uuids() -> None:
    rh = bytes(range(32))
    usr_uuid, verity_uuid = verity_uuids(rh)
    assert served_name(ID, "1.2", USR, usr_uuid) == f"demo_1.2_{usr_uuid}.usr.raw"
    assert served_name(ID, "1.2", VERITY, verity_uuid) == f"demo_1.2_{verity_uuid}.usr-verity.raw"
    assert served_name(ID, "1.2", UKI) == "demo_1.2.efi"
    with pytest.raises(ValueError):
        served_name(ID, "1.2", USR)
    assert boot_counted_name(ID, "1.2", 3) == "demo_1.2+3-0.efi"


@pytest.mark.parametrize(
    ("older", "newer"),
    [("1.9", "1.10"), ("1.0~rc1", "1.0"), ("1.0", "1.0.1"), ("1.0-1", "1.0.1"),
     ("1.0", "1.0^p1"), ("20240101", "20240102"), ("1a", "1b"), ("1.0", "1.0a"), ("0", "00a")],
)
def test_version_order_is_systemds(older: str, newer: str) -> None:
    assert vercmp(older, newer) == -1 and vercmp(newer, older) == 1
    assert vercmp(newer, newer) == 0


def test_version_order_sorts() -> None:
    assert sorted(["2.0.10", "2.0.9", "2.0.9~rc1", "1"], key=version_key) == [
        "1", "2.0.9~rc1", "2.0.9", "2.0.10"]


def fake_build(out: Path, version: str, *, payload: bytes = b"") -> Path:
    """A build output directory as `particle build` leaves it (small files)."""
    out.mkdir(parents=True, exist_ok=True)
    rh = hashlib.sha256(f"{version}{payload!r}".encode()).digest()
    stem = f"{ID}_{version}"
    files = {
        f"{stem}.usr.raw": b"usr " + version.encode() + payload,
        f"{stem}.usr-verity.raw": b"verity " + version.encode(),
        f"{stem}.efi": b"MZ uki " + version.encode(),
        f"{stem}.raw": b"disk",
        f"{stem}.manifest.json": json.dumps({"id": ID, "version": version,
                                             "root_hash": rh.hex()}).encode(),
    }
    for name, data in files.items():
        (out / name).write_bytes(data)
    old = read_sha256sums(out / "SHA256SUMS")
    old.update({n: hashlib.sha256(d).hexdigest() for n, d in files.items() if n != f"{stem}.raw"})
    (out / "SHA256SUMS").write_text(format_sha256sums(old))
    return out


def test_publish_names_index_and_content(tmp_path: Path) -> None:
    build = fake_build(tmp_path / "out", "1.0")
    srv = tmp_path / "srv"
    result = pub.publish(build, srv)
    rh = bytes.fromhex(json.loads((build / "demo_1.0.manifest.json").read_text())["root_hash"])
    usr_uuid, verity_uuid = verity_uuids(rh)
    expected = {f"demo_1.0_{usr_uuid}.usr.raw", f"demo_1.0_{verity_uuid}.usr-verity.raw",
                "demo_1.0.efi", "demo_1.0.manifest.json"}
    # Each image also gets its chunk index (delta updates; see test_store.py).
    expected |= {f"chunks.{n}.json" for n in expected if not n.endswith(".json")}
    index = read_sha256sums(srv / "SHA256SUMS")
    assert set(index) == expected
    for name, digest in index.items():
        assert hashlib.sha256((srv / name).read_bytes()).hexdigest() == digest
        assert (srv / name).stat().st_mode & 0o777 == 0o644
    assert result.version == "1.0"
    assert set(result.added) == {n for n in expected if not n.startswith("chunks.")}
    assert result.update_bytes == sum((build / f"demo_1.0{s}").stat().st_size
                                      for s in (".usr.raw", ".usr-verity.raw", ".efi"))
    assert not (srv / "demo_1.0.raw").exists()  # the disk image is not an update
    # Publishing the same build again changes nothing.
    assert pub.publish(build, srv).added == []
    assert not [p for p in srv.iterdir() if ".tmp-" in p.name]


def test_publish_keep_removes_oldest_versions(tmp_path: Path) -> None:
    srv = tmp_path / "srv"
    for v in ("1.9", "1.10", "1.11"):
        pub.publish(fake_build(tmp_path / "out", v), srv, version=v, keep=2)
    versions = {pub.version_of(n, ID) for n in read_sha256sums(srv / "SHA256SUMS")}
    assert versions == {"1.10", "1.11"}  # by version order, not by name
    assert not any(p.name.startswith("demo_1.9") for p in srv.iterdir())
    result = pub.publish(tmp_path / "out", srv, version="1.11", keep=1)
    assert result.removed_versions == ["1.10"] and result.versions == ["1.11"]
    with pytest.raises(ParticleError, match="raise --keep"):
        pub.publish(tmp_path / "out", srv, version="1.9", keep=1)


def test_publish_refuses_to_change_a_published_version(tmp_path: Path) -> None:
    srv = tmp_path / "srv"
    pub.publish(fake_build(tmp_path / "a", "1.0"), srv)
    before = (srv / "SHA256SUMS").read_text()
    with pytest.raises(ParticleError, match="different content"):
        pub.publish(fake_build(tmp_path / "b", "1.0", payload=b"!"), srv)
    assert (srv / "SHA256SUMS").read_text() == before


def test_publish_checks_the_build_digests(tmp_path: Path) -> None:
    build = fake_build(tmp_path / "out", "1.0")
    (build / "demo_1.0.efi").write_bytes(b"corrupted")
    with pytest.raises(ParticleError, match="does not match"):
        pub.publish(build, tmp_path / "srv")
    assert not (tmp_path / "srv" / "SHA256SUMS").exists()


def test_publish_keeps_other_images_and_drops_missing_entries(tmp_path: Path) -> None:
    srv = tmp_path / "srv"
    srv.mkdir()
    (srv / "other_5.efi").write_bytes(b"x")
    digest = hashlib.sha256(b"x").hexdigest()
    (srv / "SHA256SUMS").write_text(f"{digest}  other_5.efi\n{digest}  gone_1.efi\n")
    pub.publish(fake_build(tmp_path / "out", "1.0"), srv, keep=1)
    index = read_sha256sums(srv / "SHA256SUMS")
    assert index["other_5.efi"] == digest and "gone_1.efi" not in index


def test_publish_sign_hook_runs_before_the_index_is_in_place(tmp_path: Path) -> None:
    srv = tmp_path / "srv"
    seen: list[tuple[str, bool]] = []

    def sign(index: Path) -> None:
        # The new index is complete but not yet visible under its final name.
        seen.append((index.read_text(), (srv / "SHA256SUMS").exists()))
        index.with_name(index.name + ".gpg").write_bytes(b"SIG:" + index.read_bytes())

    pub.publish(fake_build(tmp_path / "out", "1.0"), srv, sign=sign)
    text = (srv / "SHA256SUMS").read_text()
    assert seen == [(text, False)]
    assert (srv / "SHA256SUMS.gpg").read_bytes() == b"SIG:" + text.encode()
    with pytest.raises(ParticleError, match="did not write"):
        pub.publish(fake_build(tmp_path / "out", "1.1"), srv, sign=lambda p: None)
    assert "1.1" not in (srv / "SHA256SUMS").read_text()  # a failed signature publishes nothing


def test_index_is_replaced_atomically(tmp_path: Path) -> None:
    """A reader polling SHA256SUMS while versions are published only ever sees whole indexes
    that name files which exist."""
    srv = tmp_path / "srv"
    pub.publish(fake_build(tmp_path / "out", "1"), srv)
    stop = threading.Event()
    problems: list[str] = []

    def reader() -> None:
        index = srv / "SHA256SUMS"
        while not stop.is_set():
            text = index.read_text()
            if not text.endswith("\n") or len(read_sha256sums(index)) * 1 == 0:
                problems.append(f"partial index: {text!r}")
            missing = [n for n in read_sha256sums(index) if not (srv / n).exists()]
            # A file may go away after a *newer* index stopped naming it, never before.
            if missing and index.read_text() == text:
                problems.append(f"{missing} listed but missing")

    t = threading.Thread(target=reader)
    t.start()
    try:
        for v in range(2, 12):
            pub.publish(fake_build(tmp_path / "out", str(v)), srv, version=str(v), keep=2)
    finally:
        stop.set()
        t.join()
    assert problems == []


def test_publish_cli(tmp_path: Path, repo: Path) -> None:
    build = fake_build(tmp_path / "out", "3")
    proc = subprocess.run(
        [sys.executable, "-m", "particleos", "publish", str(build), str(tmp_path / "srv"),
         "--keep", "2"], capture_output=True, text=True, check=False, cwd=repo)
    assert proc.returncode == 0, proc.stderr
    assert "published demo 3" in proc.stdout and "versions: 3" in proc.stdout
    assert "chunks: 3 (3 new, " in proc.stdout  # usr, verity and UKI went into the store
    proc = subprocess.run(
        [sys.executable, "-m", "particleos", "publish", str(tmp_path / "nothing"),
         str(tmp_path / "srv")], capture_output=True, text=True, check=False, cwd=repo)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr


def test_relay_copies_both_ways(tmp_path: Path) -> None:
    """What QEMU's guestfwd does: one relay process per connection, stdin/stdout to a port."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
            conn.sendall(b"got " + str(len(data)).encode())

    t = threading.Thread(target=serve)
    t.start()
    payload = os.urandom(300_000)
    proc = subprocess.run([sys.executable, str(RELAY), str(port)], input=payload,
                          capture_output=True, timeout=30, check=False)
    t.join()
    server.close()
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"got 300000"


# --- spec and build stage ---------------------------------------------------------------------


def stage_ctx(tmp_path: Path, toml: str, version: str = "7") -> BuildContext:
    spec_dir = tmp_path / "spec"
    spec_dir.mkdir(parents=True, exist_ok=True)
    (spec_dir / "particle.toml").write_text(toml)
    tree = tmp_path / "root"
    (tree / "usr/lib/systemd/system").mkdir(parents=True, exist_ok=True)
    (tree / "usr/lib/systemd/system/health.service").write_text("[Service]\nExecStart=/bin/true\n")
    ctx = BuildContext(spec=load_spec(spec_dir), version=version, output_dir=tmp_path / "out",
                       work_dir=tmp_path / "work", tools=ToolsTree())
    ctx.tree = tree
    return ctx


UPDATABLE = """
[system]
id = "demo"
[update]
source = "http://10.0.2.100/"
tries = 2
[boot]
assess = ["health.service"]
"""


def test_build_stage_writes_transfers_and_assessment(tmp_path: Path) -> None:
    ctx = stage_ctx(tmp_path, UPDATABLE)
    update_definitions(ctx)
    root = tmp_path / "root"
    written = sorted(p.name for p in (root / "usr/lib/sysupdate.d").iterdir())
    assert written == ["10-usr-verity.transfer", "20-usr.transfer", "30-uki.transfer"]
    assert "TriesLeft=2" in (root / "usr/lib/sysupdate.d/30-uki.transfer").read_text()
    units = root / "usr/lib/systemd/system"
    assert os.readlink(units / "boot-complete.target.requires/health.service") == \
        "../health.service"
    dropin = (units / "health.service.d/particle-assess.conf").read_text()
    assert "Before=boot-complete.target" in dropin and "FailureAction=reboot" in dropin


def test_build_stage_refuses_unknown_assessment_units(tmp_path: Path) -> None:
    missing = UPDATABLE.replace("health.service", "nothere.service")
    with pytest.raises(ParticleError, match=r"boot\.assess: unit nothere\.service"):
        update_definitions(stage_ctx(tmp_path / "b", missing))


def test_spec_update_and_boot_validation(tmp_path: Path) -> None:
    (tmp_path / "particle.toml").write_text(
        '[system]\nid = "demo"\n[update]\nsource = "ftp://x/"\n'
        '[boot]\nassess = ["not a unit"]\non_failure = "shrug"\n')
    with pytest.raises(SpecError) as err:
        load_spec(tmp_path)
    text = str(err.value)
    assert "update.source" in text and "http:// or https:// URL" in text
    assert "boot.assess[0]" in text and "boot.on_failure" in text
    assert "(allowed: reboot, none)" in text
    (tmp_path / "particle.toml").write_text(
        '[system]\nid = "demo"\n[update]\nsource = "updates"\n')
    assert load_spec(tmp_path).update.source == f"{tmp_path}/updates"  # relative to the spec


def test_publish_carries_the_versions_extensions(tmp_path: Path) -> None:
    """Machines with an extension installed fetch its matching version with each update."""
    build = fake_build(tmp_path / "out", "2.0")
    ext = build / "demo-devtools_2.0.raw"
    ext.write_bytes(b"sysext image")
    manifest = build / "demo_2.0.manifest.json"
    data = json.loads(manifest.read_text())
    data["extensions"] = {"devtools": {"file": ext.name}}
    manifest.write_text(json.dumps(data))
    sums = read_sha256sums(build / "SHA256SUMS")
    sums[manifest.name] = hashlib.sha256(manifest.read_bytes()).hexdigest()
    sums[ext.name] = hashlib.sha256(ext.read_bytes()).hexdigest()
    (build / "SHA256SUMS").write_text(format_sha256sums(sums))
    srv = tmp_path / "srv"
    pub.publish(build, srv)
    index = read_sha256sums(srv / "SHA256SUMS")
    assert index[ext.name] == sums[ext.name]
    assert (srv / ext.name).read_bytes() == b"sysext image"
    ext.unlink()
    with pytest.raises(ParticleError, match=r"demo-devtools_2\.0\.raw is missing"):
        pub.publish(build, tmp_path / "srv2")
