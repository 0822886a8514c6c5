"""The disk layer against the real tools (sfdisk, mkfs.vfat, mtools, mkfs.ext4) on small images."""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from uuid import UUID

import pytest

from particleos.disk import (
    ATTR_GROW_FS,
    FAT32_MIN_SIZE,
    VERITY_SIG_SIZE,
    MiB,
    Partition,
    PartType,
    ab_usr_layout,
    align_up,
    disk_size,
    format_size,
    gpt,
    make_esp,
    make_ext4,
    partition_offsets,
    partition_uuid_for,
    read_table,
    verity_size,
    write_disk,
)
from particleos.errors import ParticleError

USR_UUID = UUID("0b0e7c6a-7f3e-4d57-9c1d-4c1f8b7f2a10")
VERITY_UUID = UUID("e2a1d9c4-35b0-4e5e-8f43-9d0f6a2b7c11")
DISK_UUID = UUID("5d6c0e0a-1111-4a4a-b0b0-123456789abc")
ROOT_FS_UUID = UUID("6c4f7a3e-2b1d-4c8e-9a0f-123456789abc")
IMAGE_ID, VERSION = "particle", "1.2.3"
SLOT = 8 * MiB
ESP_FILES = {"/EFI/BOOT/BOOTX64.EFI": "bootx64.efi", "/loader/loader.conf": "loader.conf"}


@dataclass
class Build:
    disk: Path
    inputs: dict[str, Path]
    parts: list[Partition]


def make_inputs(d: Path, *, with_sig: bool = True) -> dict[str, Path]:
    """Content files from a fixed seed: same bytes on every call."""
    d.mkdir(parents=True)
    rng = random.Random(7)
    p = {name: d / name for name in ("bootx64.efi", "loader.conf", "usr", "verity", "sig")}
    p["bootx64.efi"].write_bytes(rng.randbytes(150_000))
    p["loader.conf"].write_text("timeout 0\n")
    p["usr"].write_bytes(rng.randbytes(3 * MiB + 1234))  # not sector-sized: tail stays zero
    p["verity"].write_bytes(rng.randbytes(73_728))
    if with_sig:
        p["sig"].write_bytes(b'{"rootHash":"00"}'.ljust(4096, b"\0"))
    else:
        del p["sig"]
    p["esp"] = d / "esp.img"
    make_esp(
        p["esp"], 34 * MiB, {dest: p[src] for dest, src in ESP_FILES.items()}, volume_id=0x0BADCAFE
    )
    p["root"] = d / "root.img"
    make_ext4(p["root"], 8 * MiB, "root", ROOT_FS_UUID)
    return p


def layout(p: dict[str, Path], *, usr_slot_size: int = SLOT) -> list[Partition]:
    return ab_usr_layout(
        image_id=IMAGE_ID,
        version=VERSION,
        esp=p["esp"],
        usr=p["usr"],
        usr_verity=p["verity"],
        usr_verity_sig=p.get("sig"),
        usr_uuid=USR_UUID,
        verity_uuid=VERITY_UUID,
        usr_slot_size=usr_slot_size,
        root=p["root"],
        root_size=8 * MiB,
    )


def build(d: Path) -> Build:
    inputs = make_inputs(d / "in")
    parts = layout(inputs)
    disk = d / "disk.raw"
    write_disk(disk, parts, DISK_UUID)
    return Build(disk, inputs, parts)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Build:
    return build(tmp_path_factory.mktemp("disk"))


def read_at(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def extract(b: Build, index: int, dest: Path) -> Path:
    offset = partition_offsets(b.parts)[index]
    dest.write_bytes(read_at(b.disk, offset, b.parts[index].size))
    return dest


def run(*argv: str | Path) -> str:
    return subprocess.run([str(a) for a in argv], check=True, capture_output=True, text=True).stdout


def test_partition_table(built: Build) -> None:
    table = read_table(built.disk)
    a, empty = f"{IMAGE_ID}_{VERSION}", "_empty"
    expect = [
        (PartType.ESP, "esp"),
        (PartType.USR_VERITY_SIG, a),
        (PartType.USR_VERITY, a),
        (PartType.USR, a),
        (PartType.USR_VERITY_SIG, empty),
        (PartType.USR_VERITY, empty),
        (PartType.USR, empty),
        (PartType.ROOT, "root"),
    ]
    assert [(UUID(p["type"]), p["name"]) for p in table] == expect
    uuids = [UUID(p["uuid"]) for p in table]
    assert uuids[2:4] == [VERITY_UUID, USR_UUID]
    assert uuids[5:8] == [
        partition_uuid_for(IMAGE_ID, r) for r in ("usr-verity-b", "usr-b", "root")
    ]
    assert len(set(uuids)) == len(uuids)
    assert all(p["start"] * 512 % MiB == 0 for p in table)
    sizes = [p["size"] * 512 for p in table]
    assert sizes[1:4] == sizes[4:7] == [VERITY_SIG_SIZE, verity_size(SLOT), SLOT]
    assert sizes[0] == 34 * MiB and sizes[7] == 8 * MiB
    assert table[7]["attrs"] == f"GUID:{ATTR_GROW_FS}"
    assert all("attrs" not in p for p in table[:7])
    header = json.loads(run("sfdisk", "--json", built.disk))["partitiontable"]
    assert UUID(header["id"]) == DISK_UUID and header["sectorsize"] == 512
    # util-linux reads our table as we meant it: both headers valid, the backup at the end.
    assert [(p["start"], p["size"], p["name"]) for p in header["partitions"]] == [
        (p["start"], p["size"], p["name"]) for p in table]
    assert header["lastlba"] == built.disk.stat().st_size // 512 - 34
    verify = subprocess.run(["sfdisk", "--verify", str(built.disk)], capture_output=True,
                            text=True)
    assert verify.returncode == 0 and "No errors detected" in verify.stdout, verify.stdout
    assert built.disk.stat().st_size == disk_size(built.parts)


def test_contents_at_offsets(built: Build) -> None:
    for part, offset in zip(built.parts, partition_offsets(built.parts), strict=True):
        data = read_at(built.disk, offset, part.size)
        want = part.content.read_bytes() if part.content else b""
        assert data[: len(want)] == want, part
        assert data[len(want) :].count(0) == part.size - len(want), f"{part} tail not zero"


def test_disk_is_sparse(built: Build) -> None:
    allocated = built.disk.stat().st_blocks * 512
    assert allocated < built.disk.stat().st_size // 2


def test_esp_readable(built: Build, tmp_path: Path) -> None:
    image = f"{built.disk}@@{partition_offsets(built.parts)[0]}"
    listing = run("mdir", "-i", image, "::/EFI/BOOT")
    assert "BOOTX64  EFI" in listing
    assert run("mtype", "-i", image, "::/loader/loader.conf") == "timeout 0\n"
    run("mcopy", "-i", image, "::/EFI/BOOT/BOOTX64.EFI", tmp_path / "out.efi")
    assert (tmp_path / "out.efi").read_bytes() == built.inputs["bootx64.efi"].read_bytes()
    esp = extract(built, 0, tmp_path / "esp.img")
    run("fsck.vfat", "-n", esp)
    assert esp.read_bytes()[82:90] == b"FAT32   "  # the FAT32 boot sector's type field


def test_root_passes_e2fsck(built: Build, tmp_path: Path) -> None:
    root = extract(built, 7, tmp_path / "root.img")
    run("e2fsck", "-fn", root)
    header = run("dumpe2fs", "-h", root)
    assert str(ROOT_FS_UUID) in header and "Block size:               4096" in header


def test_builds_are_byte_identical(
    built: Build, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Everything is fixed (UUIDs, FAT serial, timestamps), so the whole disk is reproducible,
    whatever the wall clock, time zone or input paths."""
    monkeypatch.setenv("TZ", "Asia/Kolkata")
    time.sleep(2.1)  # past FAT's 2-second timestamp resolution
    again = build(tmp_path)
    assert again.inputs["esp"].read_bytes() == built.inputs["esp"].read_bytes()
    assert again.inputs["root"].read_bytes() == built.inputs["root"].read_bytes()
    assert again.disk.read_bytes() == built.disk.read_bytes()


def test_usr_larger_than_slot_is_actionable(built: Build) -> None:
    with pytest.raises(ParticleError) as err:
        layout(built.inputs, usr_slot_size=2 * MiB)
    msg = str(err.value)
    assert "the usr image (3.0 MiB) does not fit usr_slot_size (2 MiB)" in msg
    assert "`image.usr_slot_size`" in msg and "4 MiB" in msg


def test_content_larger_than_partition_is_refused(built: Build, tmp_path: Path) -> None:
    parts = [replace(built.parts[0], size=MiB)]
    with pytest.raises(ParticleError, match="does not fit the partition"):
        write_disk(tmp_path / "x.raw", parts, DISK_UUID)
    assert list(tmp_path.iterdir()) == []


def test_layout_without_signature(tmp_path: Path) -> None:
    parts = layout(make_inputs(tmp_path / "in", with_sig=False))
    assert [p.type_uuid for p in parts] == [
        PartType.ESP,
        PartType.USR_VERITY,
        PartType.USR,
        PartType.USR_VERITY,
        PartType.USR,
        PartType.ROOT,
    ]


def _missing_content(parts: list[Partition], monkeypatch: pytest.MonkeyPatch, d: Path) -> None:
    parts[3] = replace(parts[3], content=d / "does-not-exist")


def _copy_fails_midway(parts: list[Partition], monkeypatch: pytest.MonkeyPatch, d: Path) -> None:
    calls: list[Path] = []
    real_copy = gpt.copy_into

    def failing_copy(fd: int, src: Path, offset: int) -> None:
        calls.append(src)
        if len(calls) == 3:  # two partitions are in the temporary file by now (the table goes last)
            assert list(d.glob(".disk.raw.tmp*"))
            raise OSError(errno.ENOSPC, "No space left on device")
        real_copy(fd, src, offset)

    monkeypatch.setattr(gpt, "copy_into", failing_copy)


Breaker = Callable[[list[Partition], pytest.MonkeyPatch, Path], None]


@pytest.mark.parametrize(
    ("break_it", "error"),
    [(_missing_content, "does-not-exist does not exist"), (_copy_fails_midway, "No space left")],
)
def test_failed_write_keeps_previous_disk(
    built: Build, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, break_it: Breaker, error: str
) -> None:
    disk = tmp_path / "disk.raw"
    disk.write_bytes(built.disk.read_bytes())
    before = disk.read_bytes()
    parts = list(built.parts)
    break_it(parts, monkeypatch, tmp_path)
    with pytest.raises((ParticleError, OSError), match=error):
        write_disk(disk, parts, UUID(int=1))
    assert disk.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk.raw"]


def test_small_esp_is_grown_to_fat32(tmp_path: Path) -> None:
    esp = tmp_path / "esp.img"
    make_esp(esp, 4 * MiB, {})
    assert esp.stat().st_size == FAT32_MIN_SIZE
    assert "WARNING" not in run("fsck.vfat", "-n", esp)
    assert [p.name for p in tmp_path.iterdir()] == ["esp.img"]


def test_only_512_byte_sectors(tmp_path: Path) -> None:
    with pytest.raises(ParticleError, match="512"):
        write_disk(tmp_path / "d.raw", [], DISK_UUID, sector_size=4096)


@pytest.mark.parametrize(
    ("slot", "expected"),
    [(8 * MiB, MiB), (1 << 30, 9 * MiB), (4096, MiB), (10 << 30, 81 * MiB)],
)
def test_verity_size(slot: int, expected: int) -> None:
    assert verity_size(slot) == expected
    blocks = slot // 4096
    assert verity_size(slot) >= align_up(blocks * 32 + 4096, 4096)


def test_sizes() -> None:
    assert align_up(1, MiB) == MiB and align_up(MiB, MiB) == MiB and align_up(0, 512) == 0
    assert format_size(512) == "512 B"
    assert format_size(8 * MiB) == "8 MiB"
    assert format_size(3 * MiB + MiB // 2) == "3.5 MiB"
    assert format_size(1 << 30) == "1 GiB"


def test_copy_without_copy_file_range(
    built: Build, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The read/write fallback (other file systems, old kernels) gives the same disk."""

    def unsupported(*args: object) -> int:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", unsupported)
    disk = tmp_path / "disk.raw"
    write_disk(disk, built.parts, DISK_UUID)
    assert disk.read_bytes() == built.disk.read_bytes()
