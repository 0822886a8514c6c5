"""Machine side of A/B updates, from fixture inputs: GPT parsing against sfdisk, UKI (PE)
sections, boot entry names and systemd-boot's order, slots, status rendering, the choice a
rollback makes, and that everything runs on python3-minimal."""

from __future__ import annotations

import ast
import json
import struct
from pathlib import Path
from uuid import UUID

import pytest

from particleos import formats
from particleos.disk import MiB, Partition, PartType, read_table, write_disk
from particleos.machine import entries, gpt, pe, status
from particleos.machine.cli import MachineError
from particleos.machine.update import (
    choose_rollback,
    clean_stale_downloads,
    running_unproven,
)

ID = "demo"
MACHINE = Path(__file__).resolve().parents[2] / "src/particleos/machine"
# What python3-minimal (trixie) can import: checked in the image tree, see the module docs.
MINIMAL_MODULES = {
    "__future__", "argparse", "ast", "base64", "collections", "contextlib", "dataclasses",
    "enum", "errno", "fcntl", "fnmatch", "functools", "glob", "hashlib", "importlib", "io",
    "itertools", "json", "os", "pathlib", "re", "select", "signal", "stat", "string",
    "struct", "subprocess", "sys", "tempfile", "textwrap", "threading", "time", "typing",
    "warnings", "binascii", "zlib", "math",
}
MY_MODULES = ("bootlog", "changes", "delta", "entries", "gpt", "pe", "status", "switch",
              "update", "versions")


@pytest.mark.parametrize("module", MY_MODULES)
def test_machine_modules_use_only_python3_minimal(module: str) -> None:
    tree = ast.parse((MACHINE / f"{module}.py").read_text())
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            assert name.split(".")[0] in MINIMAL_MODULES, f"{module}.py imports {name}"


# --- GPT -------------------------------------------------------------------------------------


def dashed(hex32: str) -> str:
    return formats.guid_text(bytes.fromhex(hex32))


def test_gpt_parsing_matches_sfdisk(tmp_path: Path) -> None:
    u = [UUID(int=i * 0x1111_2222_3333_4444_5555_6666_7777_8888 % (1 << 128)) for i in range(1, 6)]
    parts = [
        Partition("esp", PartType.ESP, u[0], 2 * MiB),
        Partition(f"{ID}_1.0", PartType.USR_VERITY, u[1], MiB),
        Partition(f"{ID}_1.0", PartType.USR, u[2], 4 * MiB),
        Partition("_empty", PartType.USR_VERITY, u[3], MiB),
        Partition("_empty", PartType.USR, u[4], 4 * MiB, attrs=(60,)),
    ]
    disk = tmp_path / "disk.raw"
    write_disk(disk, parts, UUID(int=99))
    with disk.open("rb") as f:
        def read(off: int, size: int) -> bytes:
            f.seek(off)
            return f.read(size)
        parsed = gpt.parse_gpt(read)
    table = read_table(disk)
    assert [p.number for p in parsed] == [1, 2, 3, 4, 5]
    assert [p.label for p in parsed] == [t["name"] for t in table]
    assert [p.uuid for p in parsed] == [t["uuid"].lower() for t in table]
    assert [p.type for p in parsed] == [t["type"].lower() for t in table]
    assert parsed[4].attrs == 1 << 60
    slots = status.slots_from_gpt(parsed, ID)
    assert [(s.name, s.usr.number, s.verity.number if s.verity else 0, s.version, s.state)
            for s in slots] == [("A", 3, 2, "1.0", "no boot entry"), ("B", 5, 4, None, "empty")]
    with pytest.raises(gpt.GptError):
        gpt.parse_gpt(lambda off, size: bytes(size))


def test_guid_text_forms() -> None:
    u = UUID("0b0e7c6a-7f3e-4d57-9c1d-4c1f8b7f2a10")
    assert formats.guid_from_gpt(u.bytes_le) == str(u)
    assert dashed(u.hex) == str(u)


# --- UKIs ------------------------------------------------------------------------------------


def make_pe(sections: dict[str, bytes]) -> bytes:
    """A minimal PE file with the given sections (enough for the section reader)."""
    head = bytearray(64)
    head[:2] = b"MZ"
    struct.pack_into("<I", head, 0x3C, 64)
    coff = b"PE\0\0" + struct.pack("<HHIIIHH", 0x8664, len(sections), 0, 0, 0, 0, 0x22)
    table, data = b"", b""
    offset = 64 + len(coff) + 40 * len(sections)
    for name, content in sections.items():
        table += struct.pack("<8sIIIIIIHHI", name.encode(), len(content), 0, len(content),
                             offset + len(data), 0, 0, 0, 0, 0)
        data += content
    return bytes(head) + coff + table + data


def write_uki(esp: Path, name: str, version: str, usrhash: str = "ab" * 32,
              uname: str = "6.12.0") -> Path:
    path = esp / "EFI/Linux" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    osrel = f'ID=debian\nIMAGE_ID="{ID}"\nIMAGE_VERSION="{version}"\n'.encode()
    cmdline = f"usrhash={usrhash} mount.usr=/dev/mapper/usr mount.usrfstype=erofs\n\0".encode()
    path.write_bytes(make_pe({".osrel": osrel, ".cmdline": cmdline, ".uname": uname.encode(),
                              ".linux": b"KERNEL", ".initrd": b"INITRD"}))
    return path


def test_pe_sections(tmp_path: Path) -> None:
    path = write_uki(tmp_path, "x_1.efi", "1")
    assert pe.read_text(path, ".uname") == "6.12.0"
    assert "usrhash=" in (pe.read_text(path, ".cmdline") or "")
    assert pe.read_section(path, ".missing") is None
    pe.extract(path, ".linux", tmp_path / "linux")
    assert (tmp_path / "linux").read_bytes() == b"KERNEL"
    (tmp_path / "bad.efi").write_bytes(b"not a PE file at all" * 4)
    with pytest.raises(pe.PEError):
        pe.sections(tmp_path / "bad.efi")


@pytest.mark.parametrize(
    ("name", "parsed"),
    [
        ("demo_1.2.efi", ("demo_1.2.efi", None, None)),
        ("demo_1.2+3-0.efi", ("demo_1.2.efi", 3, 0)),
        ("demo_1.2+0-2.efi", ("demo_1.2.efi", 0, 2)),
        ("demo_1.2+1.efi", ("demo_1.2.efi", 1, 0)),
        ("demo_1+x.efi", ("demo_1+x.efi", None, None)),
        ("demo.conf", None),
    ],
)
def test_entry_names(name: str, parsed: tuple[str, int | None, int | None] | None) -> None:
    assert entries.parse_name(name) == parsed


def efivar(d: Path, name: str, value: str) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}-{entries.LOADER_GUID}").write_bytes(
        b"\x06\0\0\0" + (value + "\0").encode("utf-16-le"))


def test_entries_in_boot_order_with_default_and_booted(tmp_path: Path) -> None:
    esp, efivars = tmp_path / "esp", tmp_path / "efivars"
    write_uki(esp, "demo_1.9.efi", "1.9")
    write_uki(esp, "demo_1.10+0-2.efi", "1.10")  # failed all its tries
    write_uki(esp, "demo_1.11+2-1.efi", "1.11")  # being tried
    (esp / "EFI/Linux/.#sysupdatedemo_1.12+3-0.efi1234").write_bytes(b"partial")
    efivar(efivars, "LoaderEntrySelected", "demo_1.9.efi")
    found = entries.list_entries(esp, efivars)
    assert [(e.version, e.state) for e in found] == [
        ("1.11", "pending"), ("1.9", "good"), ("1.10", "bad")]
    assert [e.default for e in found] == [True, False, False]
    assert [e.booted for e in found] == [False, True, False]
    # An explicit default (bootctl set-default) wins over the order.
    efivar(efivars, "LoaderEntryDefault", "demo_1.9.efi")
    assert [e.version for e in entries.list_entries(esp, efivars) if e.default] == ["1.9"]
    # The one-shot entry wins over everything.
    efivar(efivars, "LoaderEntryOneShot", "demo_1.10.efi")
    assert [e.version for e in entries.list_entries(esp, efivars) if e.default] == ["1.10"]


def test_mark_bad_and_rollback_choice(tmp_path: Path) -> None:
    esp, efivars = tmp_path / "esp", tmp_path / "efivars"
    write_uki(esp, "demo_2.efi", "2", usrhash="22" * 32)
    write_uki(esp, "demo_4.efi", "4", usrhash="44" * 32)
    found = entries.list_entries(esp, efivars)
    bad, back = choose_rollback(found, {"demo_2.efi": True, "demo_4.efi": True})
    assert (bad.version, back.version) == ("4", "2")
    assert entries.mark_bad(bad).name == "demo_4+0-1.efi"
    found = entries.list_entries(esp, efivars)
    assert [(e.version, e.state, e.default) for e in found] == [
        ("2", "good", True), ("4", "bad", False)]
    # Nothing good left behind the default: rollback refuses and changes nothing.
    with pytest.raises(MachineError, match="no other good version"):
        choose_rollback(found, {"demo_2.efi": True})
    # An entry whose /usr is gone from the disk is no place to go back to.
    write_uki(esp, "demo_5+1-1.efi", "5", usrhash="55" * 32)
    with pytest.raises(MachineError, match="no other good version"):
        choose_rollback(entries.list_entries(esp, efivars), {"demo_5.efi": True})


def test_stale_downloads_are_removed(tmp_path: Path) -> None:
    write_uki(tmp_path, "demo_1.efi", "1")
    stale = tmp_path / "EFI/Linux/.#sysupdatedemo_2+3-0.efi5f1d"
    stale.write_bytes(b"half")
    assert clean_stale_downloads(tmp_path) == [stale]
    assert [p.name for p in (tmp_path / "EFI/Linux").iterdir()] == ["demo_1.efi"]


# --- status ----------------------------------------------------------------------------------


def test_status_links_entries_to_slots_and_renders(tmp_path: Path) -> None:
    rh_a, rh_b = "aa" * 16 + "bb" * 16, "cc" * 16 + "dd" * 16
    table = [
        gpt.Partition(2, gpt.USR_VERITY, dashed(rh_a[32:]), f"{ID}_1", 0, 0, 0),
        gpt.Partition(3, gpt.USR, dashed(rh_a[:32]), f"{ID}_1", 0, 0, 0),
        gpt.Partition(4, gpt.USR_VERITY, dashed(rh_b[32:]), f"{ID}_2", 0, 0, 0),
        gpt.Partition(5, gpt.USR, dashed(rh_b[:32]), f"{ID}_2", 0, 0, 0),
    ]
    slots = status.slots_from_gpt(table, ID)
    slots[1].running = True
    esp = tmp_path / "esp"
    write_uki(esp, "demo_1.efi", "1", usrhash=rh_a)
    write_uki(esp, "demo_2+2-0.efi", "2", usrhash=rh_b)
    write_uki(esp, "demo_0.efi", "0", usrhash="ee" * 32)
    found = entries.list_entries(esp, tmp_path / "efivars")
    status.link_entries(slots, found)
    assert slots[0].entries == ["demo_1.efi"] and slots[1].entries == ["demo_2+2-0.efi"]
    assert [s.state for s in slots] == ["installed", "running"]
    orphan = next(e for e in found if e.version == "0")
    assert orphan.notes == ["its /usr is not on this disk"]
    st = {
        "id": ID, "version": "2", "running_slot": "B", "disk": "/dev/vda", "esp": str(esp),
        "booted_entry": "demo_1.efi",
        "boot_assessment": {"bless_boot": "good", "boot_complete": "active",
                            "marked_good": True},
        "slots": [s.to_json() for s in slots],
        "entries": [e.to_json() | {"notes": e.notes} for e in found],
        "pending": None, "update_source": "http://10.0.2.100/", "notes": ["soft"],
    }
    json.dumps(st)  # JSON-serialisable as `particle status --json` prints it
    text = status.render(st)
    assert "demo 2  (running from slot B, boot entry demo_1.efi)" in text
    assert "being tried (2 left, 0 done)  [default]" in text
    assert "marked good" in text and "note:       soft" in text


def test_update_source_from_transfer_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "sysupdate.d"
    d.mkdir()
    (d / "20-usr.transfer").write_text("[Transfer]\nVerify=no\n[Source]\nType=url-file\n"
                                       "Path=https://u.example/x/\n[Target]\nPath=auto\n")
    monkeypatch.setattr(status, "SYSUPDATE_DIRS", (tmp_path / "none", d))
    assert status.update_source() == "https://u.example/x/"
    monkeypatch.setattr(status, "SYSUPDATE_DIRS", (tmp_path / "none",))
    assert status.update_source() is None


def test_machine_cli_has_the_update_verbs() -> None:
    from particleos.machine.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["update", "--soft"])
    assert args.soft and not args.reboot and args.func.__name__ == "cmd_update"
    assert parser.parse_args(["rollback", "--reboot"]).reboot
    assert parser.parse_args(["status", "--json"]).status_json
    with pytest.raises(SystemExit):
        parser.parse_args(["update", "--soft", "--reboot"])


def test_soft_switch_picks_soft_reboot_for_the_same_kernel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    from particleos.machine import switch

    calls: list[str] = []
    monkeypatch.setattr(switch, "soft_reboot", lambda e, d: calls.append(f"soft {e.version}"))
    monkeypatch.setattr(switch, "kexec", lambda e: calls.append(f"kexec {e.version}"))
    same = entries.read_entry(write_uki(tmp_path, "demo_2+2-0.efi", "2",
                                        uname=os.uname().release))
    other = entries.read_entry(write_uki(tmp_path, "demo_3+2-0.efi", "3", uname="0.0-other"))
    assert same is not None and other is not None
    switch.switch(same, "vda")
    switch.switch(other, "vda")
    switch.switch(same, "vda", force_kexec=True)
    assert calls == ["soft 2", "kexec 3", "kexec 2"]
    assert switch.cmdline_value(same.cmdline, "mount.usrfstype") == "erofs"


def test_kexec_without_kexec_tools_says_what_to_do(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    from particleos.machine import switch

    monkeypatch.setattr(switch, "KEXEC_CANDIDATES", (str(tmp_path / "no-kexec"),))
    e = entries.read_entry(write_uki(tmp_path, "demo_3+2-0.efi", "3", uname="0.0-other"))
    assert e is not None
    with pytest.raises(MachineError, match="kexec-tools"):
        switch.kexec(e)


def test_update_refuses_to_overwrite_the_last_good_version(tmp_path: Path) -> None:
    esp, efivars = tmp_path / "esp", tmp_path / "efivars"
    write_uki(esp, "demo_2.efi", "2")
    write_uki(esp, "demo_3+2-0.efi", "3")
    efivar(efivars, "LoaderEntrySelected", "demo_2.efi")
    found = entries.list_entries(esp, efivars)
    # Running 3 after a soft switch: 2 is the only version known to boot.
    why = running_unproven(found, "3")
    assert why is not None and "without a firmware boot" in why and "overwrite 2" in why
    assert running_unproven(found, "2") is None  # running a good version: fine
    assert running_unproven(found, "9") is None  # no entry for it: nothing to judge
