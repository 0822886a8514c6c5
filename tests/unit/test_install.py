"""Install to a disk and factory reset, the parts that need no VM: the GPT we write (checked by
sfdisk), the layout of a target, the refusal rules, the host's `particle install` into files,
and the factory-reset request (EFI variable, confirmation)."""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from particleos import formats
from particleos.machine import install as life
from particleos.machine import reset
from particleos.machine.cli import main as machine_main

from .conftest import Run
from .test_disk import Build, build

MiB = 1 << 20


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Build:
    return build(tmp_path_factory.mktemp("image"))


def sfdisk_json(path: Path) -> dict[str, object]:
    out = subprocess.run(["sfdisk", "--json", str(path)], check=True, capture_output=True,
                         text=True).stdout
    table: dict[str, object] = json.loads(out)["partitiontable"]
    return table


def verify(path: Path) -> None:
    r = subprocess.run(["sfdisk", "--verify", str(path)], capture_output=True, text=True)
    assert r.returncode == 0 and "No errors detected" in r.stdout, r.stdout + r.stderr


# --- the GPT writer ----------------------------------------------------------------------------

def test_gpt_writes_what_sfdisk_reads(tmp_path: Path) -> None:
    parts = [
        formats.GptPartition(1, formats.ESP, formats.random_guid(), "esp", 2048, 4095, 0),
        formats.GptPartition(3, formats.ROOT, formats.random_guid(), "root", 8192, 12287,
                             1 << formats.ATTR_GROW_FS),
    ]
    disk, size = tmp_path / "d.raw", 16 * MiB
    disk.write_bytes(b"")
    os.truncate(disk, size)
    guid = formats.random_guid()
    fd = os.open(disk, os.O_WRONLY)
    for offset, data in formats.gpt_writes(parts, size, guid):
        os.pwrite(fd, data, offset)
    os.close(fd)
    verify(disk)
    table = sfdisk_json(disk)
    assert table["id"] == guid.upper() and table["lastlba"] == size // 512 - 34
    got = [(p["node"][-1], p["type"].lower(), p["uuid"].lower(), p["name"], p["start"],
            p.get("attrs")) for p in table["partitions"]]  # type: ignore[attr-defined]
    assert got == [("1", formats.ESP, parts[0].uuid, "esp", 2048, None),
                   ("3", formats.ROOT, parts[1].uuid, "root", 8192, "GUID:59")]
    assert formats.read_gpt(disk) == parts


def test_gpt_refuses_overlaps_and_partitions_past_the_end() -> None:
    a = formats.GptPartition(1, formats.ESP, formats.random_guid(), "a", 2048, 4095, 0)
    with pytest.raises(formats.GptError, match="overlaps"):
        formats.gpt_writes([a, replace(a, number=2, first_lba=4000, last_lba=5000)], 16 * MiB,
                           formats.random_guid())
    with pytest.raises(formats.GptError, match="does not fit"):
        formats.gpt_writes([replace(a, last_lba=32767)], 16 * MiB, formats.random_guid())


# --- the layout of a target ---------------------------------------------------------------------

def ab_parts() -> list[formats.GptPartition]:
    """A machine's disk: slot A holds 1.0, slot B 2.0 (running), then root."""
    g = formats.random_guid
    return [
        formats.GptPartition(1, formats.ESP, g(), "esp", 2048, 8191, 0),
        formats.GptPartition(2, formats.USR_VERITY_SIG, g(), "os_1.0", 8192, 8223, 0),
        formats.GptPartition(3, formats.USR_VERITY, g(), "os_1.0", 10240, 12287, 0),
        formats.GptPartition(4, formats.USR, g(), "os_1.0", 12288, 20479, 0),
        formats.GptPartition(5, formats.USR_VERITY_SIG, g(), "os_2.0", 20480, 20511, 0),
        formats.GptPartition(6, formats.USR_VERITY, g(), "os_2.0", 22528, 24575, 0),
        formats.GptPartition(7, formats.USR, g(), "os_2.0", 24576, 32767, 0),
        formats.GptPartition(8, formats.ROOT, g(), "root", 32768, 65535, 1 << 59),
    ]


def test_machine_plan_copies_the_running_slot_and_empties_the_other() -> None:
    src = ab_parts()
    p = life.plan(src, {5, 6, 7}, with_root=False, new_esp_uuid=True)
    by_number = {pc.part.number: pc for pc in p.pieces}
    assert sorted(by_number) == [1, 2, 3, 4, 5, 6, 7]  # root is left to repart
    assert [n for n, pc in by_number.items() if pc.copy] == [1, 5, 6, 7]
    for n in (5, 6, 7):
        assert by_number[n].part == src[n - 1]  # same label, UUID, place
    # The ESP: same place and label, its own UUID (the initrd tells the two disks apart by it).
    assert by_number[1].part == replace(src[0], uuid=by_number[1].part.uuid) != src[0]
    for n in (2, 3, 4):
        emptied = by_number[n].part
        assert emptied.label == formats.EMPTY_LABEL and emptied.uuid != src[n - 1].uuid
        assert (emptied.first_lba, emptied.last_lba) == (src[n - 1].first_lba, src[n - 1].last_lba)
    # The end of slot B, room for a root partition, and the backup GPT.
    assert p.needed == 32768 * 512 + life.MIN_ROOT + 33 * 512


def test_host_plan_keeps_root_and_the_empty_slot() -> None:
    src = ab_parts()
    src[1:4] = [replace(q, label=formats.EMPTY_LABEL) for q in src[1:4]]
    p = life.plan(src, {5, 6, 7}, with_root=True)
    assert [pc.part for pc in p.pieces] == src  # nothing renamed: the built image as it is
    assert [pc.copy for pc in p.pieces] == [True, False, False, False, True, True, True, True]
    assert p.needed == 65536 * 512 + 33 * 512


def test_plan_needs_a_usr_and_an_esp() -> None:
    src = ab_parts()
    with pytest.raises(life.InstallError, match="no /usr"):
        life.plan(src, set(), with_root=True)
    with pytest.raises(life.InstallError, match="no ESP"):
        life.plan(src[1:], {5, 6, 7}, with_root=True)


# --- refusal rules ------------------------------------------------------------------------------

def test_refusals() -> None:
    ok = life.TargetState("/dev/vdb", True, 4 << 30)
    assert life.refusals(ok, 3 << 30, force=False) == []
    full = replace(ok, signatures=["vdb: gpt", "vdb1: vfat"])
    refused = life.refusals(full, 1, force=False)
    assert "not empty (vdb: gpt, vdb1: vfat); pass --force" in refused[0]
    assert life.refusals(full, 1, force=True) == []
    busy = replace(ok, in_use=["/dev/vdb1 is mounted on /mnt"])
    assert life.refusals(busy, 1, force=True) == [
        "/dev/vdb is in use: /dev/vdb1 is mounted on /mnt (unmount or stop it first)"]
    assert life.refusals(replace(ok, source="the disk this system runs from"), 1, force=True) == [
        "/dev/vdb is the disk this system runs from"]
    assert "too small: at least 5 GiB" in life.refusals(ok, 5 << 30, force=True)[0]
    assert "4096-byte sectors" in life.refusals(replace(ok, sector=4096), 1, force=True)[0]


def fake_sysfs(root: Path) -> Path:
    """/sys/class/block with a disk vdb (partitions vdb1, vdb2) and its /proc."""
    sys_block = root / "sys"
    disk = sys_block / "vdb"
    (disk / "queue").mkdir(parents=True)
    (disk / "dev").write_text("254:16\n")
    (disk / "size").write_text(f"{8 << 21}\n")
    (disk / "queue/logical_block_size").write_text("512\n")
    for n in (1, 2):
        part = disk / f"vdb{n}"
        (part / "holders").mkdir(parents=True)
        (part / "partition").write_text(f"{n}\n")
        (part / "dev").write_text(f"254:{16 + n}\n")
        (sys_block / f"vdb{n}").symlink_to(part)
    (disk / "vdb2/holders/dm-3").mkdir()
    proc = root / "proc" / "self"
    proc.mkdir(parents=True)
    (proc / "mountinfo").write_text(
        "22 1 254:1 / / rw - ext4 /dev/vda1 rw\n"
        "40 22 254:17 / /mnt rw,relatime - vfat /dev/vdb1 rw\n")
    (root / "proc/swaps").write_text("Filename Type Size Used Priority\n")
    return sys_block


def test_inspect_block_finds_mounts_holders_and_signatures(tmp_path: Path) -> None:
    sys_block = fake_sysfs(tmp_path)
    probed: list[str] = []

    def probe(dev: str) -> list[str]:
        probed.append(dev)
        return [f"{dev[5:]}: gpt"] if dev == "/dev/vdb" else []

    st = life.inspect_block("/dev/vdb", probe, sys_block, tmp_path / "proc")
    assert st.size == 8 << 30 and st.block and st.sector == 512
    assert st.in_use == ["/dev/vdb1 is mounted on /mnt", "/dev/vdb2 is held by dm-3"]
    assert st.signatures == ["vdb: gpt"] and probed == ["/dev/vdb", "/dev/vdb1", "/dev/vdb2"]
    with pytest.raises(life.InstallError, match=r"a partition: name the whole disk \(/dev/vdb\)"):
        life.inspect_block("/dev/vdb1", probe, sys_block, tmp_path / "proc")
    with pytest.raises(life.InstallError, match="not a block device"):
        life.inspect_block("/dev/nothing", probe, sys_block, tmp_path / "proc")


def test_parse_wipefs() -> None:
    assert life.parse_wipefs("") == []
    out = json.dumps({"signatures": [
        {"device": "vdb", "offset": "0x200", "type": "gpt"},
        {"device": "vdb", "offset": "0x1fe", "type": "PMBR"}]})
    assert life.parse_wipefs(out) == ["vdb: PMBR", "vdb: gpt"]


# --- the host's particle install ---------------------------------------------------------------

def test_host_install_into_a_bigger_file(image: Build, tmp_path: Path, run: Run) -> None:
    target = tmp_path / "big.raw"
    r = run("install", str(image.disk), str(target), "--size", "64M")
    assert r.code == 0, r.err
    assert "installed 1.2.3" in r.out
    assert target.stat().st_size == 64 * MiB
    assert target.stat().st_blocks * 512 < 2 * image.disk.stat().st_size  # sparse
    verify(target)
    assert sfdisk_json(target)["lastlba"] == 64 * MiB // 512 - 34
    src, dst = formats.read_gpt(image.disk), formats.read_gpt(target)
    assert dst == src  # same entries, same places; only the disk size differs
    with open(image.disk, "rb") as a, open(target, "rb") as b:
        for p in src:  # every partition's bytes, the empty slot's zeros included
            a.seek(p.start())
            b.seek(p.start())
            assert a.read(p.size()) == b.read(p.size()), p.label


def test_copy_onto_a_used_device_writes_each_byte_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A block device holds old data: what the copy leaves out (holes, all-zero chunks) is
    zeroed, and nothing it writes is zeroed first. (A file stands in for the device: the
    BLKZEROOUT ioctl fails on it and zero_range writes the zeros itself.)"""
    size = 8 * MiB
    src_path, dst_path = tmp_path / "src.raw", tmp_path / "dev.raw"
    with open(src_path, "wb") as f:
        f.truncate(size)  # a hole after 3 MiB
        f.write(bytes(2 * MiB) + b"\x01" * (MiB + 512) + bytes(512))  # zeros, data, zeros
        f.seek(6 * MiB + 4096)
        f.write(b"\x02" * 8192)
    dst_path.write_bytes(b"\xff" * size)
    zeroed: list[tuple[int, int]] = []
    real_zero = life.zero_range

    def zero(fd: int, offset: int, length: int, block: bool) -> None:
        if length > 0:
            zeroed.append((offset, offset + length))
        real_zero(fd, offset, length, block)

    monkeypatch.setattr(life, "zero_range", zero)
    src, dst = os.open(src_path, os.O_RDONLY), os.open(dst_path, os.O_RDWR)
    try:
        life.copy_range(src, dst, MiB // 2, size - MiB, block=True)
    finally:
        os.close(src)
        os.close(dst)
    source, device = src_path.read_bytes(), dst_path.read_bytes()
    assert device[MiB // 2:size - MiB // 2] == source[MiB // 2:size - MiB // 2]
    assert device[:MiB // 2] == device[size - MiB // 2:] == b"\xff" * (MiB // 2)  # outside
    data = [(2 * MiB, 3 * MiB + 512), (6 * MiB + 4096, 6 * MiB + 4096 + 8192)]
    assert (MiB // 2, 3 * MiB // 2) in zeroed  # an all-zero chunk of data, left out
    assert not [(z, d) for z in zeroed for d in data if z[0] < d[1] and d[0] < z[1]]


def test_host_install_refuses(image: Build, tmp_path: Path, run: Run) -> None:
    target = tmp_path / "t.raw"
    assert run("install", str(image.disk), str(target)).code == 0
    before = target.read_bytes()
    r = run("install", str(image.disk), str(target))
    assert r.code == 1 and "is not empty" in r.err and "--force" in r.err
    assert target.read_bytes() == before
    assert run("install", str(image.disk), str(target), "--force").code == 0
    r = run("install", str(image.disk), str(image.disk), "--force")
    assert r.code == 1 and "is the image being installed" in r.err
    r = run("install", str(image.disk), str(tmp_path / "small.raw"), "--size", "8M")
    assert r.code == 1 and "too small" in r.err and not (tmp_path / "small.raw").exists()
    r = run("install", str(tmp_path / "t.raw.none"), str(tmp_path / "x.raw"))
    assert r.code == 1 and "no such image" in r.err


# --- factory reset -----------------------------------------------------------------------------

def test_factory_reset_variable(tmp_path: Path) -> None:
    efivars = tmp_path / "efivars"
    efivars.mkdir()
    assert not reset.requested(efivars)
    reset.request(efivars)
    data = (efivars / f"FactoryReset-{reset.SYSTEMD_VENDOR}").read_bytes()
    assert struct.unpack("<I", data[:4])[0] == 7 and data[4:] == "1\0".encode("utf-16-le")
    assert reset.requested(efivars)
    assert reset.cancel(efivars) and not reset.requested(efivars)
    assert not reset.cancel(efivars)


def test_the_image_root_definition_allows_a_reset(tmp_path: Path) -> None:
    from particleos.builder.repart import ROOT_DEFINITION

    name = Path(ROOT_DEFINITION).name
    shipped = Path(life.__file__).parent.parent / "data" / "repart" / name
    d = tmp_path / "repart.d"
    d.mkdir()
    (d / name).write_bytes(shipped.read_bytes())
    assert reset.reset_definitions((d,)) == [d / name]
    keys = dict(ln.split("=", 1) for ln in shipped.read_text().splitlines() if "=" in ln
                and not ln.startswith("#"))
    assert keys["Type"] == "root" and keys["Format"] == "ext4" and "SizeMaxBytes" not in keys
    (d / name).write_text("[Partition]\nType=root\n")
    assert reset.reset_definitions((d,)) == []


@pytest.mark.parametrize("encrypt", ["off", "tpm2"])
def test_one_root_definition_the_shipped_one(tmp_path: Path, encrypt: str) -> None:
    """The build writes data/repart/50-root.conf, and for an encrypted root the same plus the
    LUKS2 lines: one definition, written by one stage."""
    from particleos.builder.repart import ROOT_DEFINITION, root_partition
    from particleos.spec.model import Spec

    class Ctx:  # the two fields the stage reads
        spec = Spec.model_validate({"system": {"id": "demo"}, "image": {"encrypt": encrypt}})
        tree = tmp_path / "tree"

    root_partition(Ctx())  # type: ignore[arg-type]
    written = (tmp_path / "tree" / ROOT_DEFINITION).read_text()
    shipped = (Path(life.__file__).parent.parent / "data/repart/50-root.conf").read_text()
    extra = written.removeprefix(shipped)
    assert extra != written
    assert ("Encrypt=tpm2" in extra.splitlines()) == (encrypt == "tpm2")
    assert reset.reset_definitions((tmp_path / "tree/usr/lib/repart.d",)) != []


def test_bookworm_has_no_root_definition_and_refuses_a_reset(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """bookworm's initrd has no repart and its repart (systemd 252) does not read the
    FactoryReset variable: the image ships no definition, and factory-reset refuses."""
    from particleos.builder.repart import ROOT_DEFINITION, root_partition
    from particleos.spec.model import Spec

    class Ctx:
        spec = Spec.model_validate({"system": {"id": "demo", "release": "bookworm"}})
        tree = tmp_path / "tree"

    root_partition(Ctx())  # type: ignore[arg-type]
    assert not (tmp_path / "tree" / ROOT_DEFINITION).exists()
    efivars = tmp_path / "efivars"
    efivars.mkdir()
    monkeypatch.setattr(reset, "EFIVARS", efivars)
    monkeypatch.setattr(reset, "REPART_DIRS", (tmp_path / "tree/usr/lib/repart.d",))
    assert machine_main(["factory-reset", "--yes"]) == 1
    err = capsys.readouterr().err
    assert "no repart definition with FactoryReset=yes" in err and "bookworm" in err
    assert not reset.requested(efivars)
    # Nor does `particle install DEVICE` on such a machine: the copy would have no root.
    target = tmp_path / "blank.img"
    target.write_bytes(b"")
    assert machine_main(["install", str(target), "--yes"]) == 1
    err = capsys.readouterr().err
    assert "no systemd-repart root definition" in err and "particle install IMAGE" in err
    assert target.stat().st_size == 0  # nothing written


def test_factory_reset_asks_and_refuses_without_a_terminal(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    efivars = tmp_path / "efivars"
    efivars.mkdir()
    d = tmp_path / "repart.d"
    d.mkdir()
    (d / "50-root.conf").write_text("[Partition]\nType=root\nFactoryReset=yes\n")
    monkeypatch.setattr(reset, "EFIVARS", efivars)
    monkeypatch.setattr(reset, "REPART_DIRS", (d,))
    monkeypatch.setattr("sys.stdin", open(os.devnull))  # noqa: SIM115
    assert machine_main(["factory-reset"]) == 1
    assert "pass --yes" in capsys.readouterr().err and not reset.requested(efivars)
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    monkeypatch.setattr("builtins.input", lambda q: "n")
    assert machine_main(["factory-reset"]) == 1 and not reset.requested(efivars)
    assert machine_main(["factory-reset", "--yes"]) == 0 and reset.requested(efivars)
    assert "next boot erases the root partition" in capsys.readouterr().out
    assert machine_main(["factory-reset", "--cancel"]) == 0 and not reset.requested(efivars)
    monkeypatch.setattr(reset, "REPART_DIRS", (tmp_path / "none",))
    assert machine_main(["factory-reset", "--yes"]) == 1
    assert "no repart definition with FactoryReset=yes" in capsys.readouterr().err


def test_machine_install_verb_is_registered() -> None:
    from particleos.machine.cli import build_parser

    args = build_parser().parse_args(["install", "/dev/vdb", "--yes"])
    assert isinstance(args, argparse.Namespace) and args.device == "/dev/vdb" and args.yes
