"""Boot loader updates: the rule that decides whether a version's systemd-boot goes onto the
ESP, the atomic install on a directory standing in for the ESP, `particle loader update` and
`particle status` on a fake machine, and the build side ([boot] loader, the unit, the mask of
systemd-boot-update.service)."""

from __future__ import annotations

import ast
import hashlib
import json
import os
from pathlib import Path

import pytest

from particleos.builder.loader import BOOT_UPDATE, SDBOOT, UNIT, ship_loader
from particleos.machine import entries, loader
from particleos.machine.cli import main as machine_main
from particleos.machine.loader import FALLBACK, PRIMARY, STAMP, Decision, LoaderFile, decide

from .conftest import Run
from .test_fallback import stage_ctx
from .test_machine_updates import MINIMAL_MODULES, efivar, write_uki

OLD, NEW = "257.13-1~deb13u1", "258.1-1"


def sdboot(version: str, payload: bytes = b"") -> bytes:
    """Enough of a systemd-boot binary for the rule: a PE header and the .sdmagic string."""
    return (b"MZ" + bytes(62) + f"#### LoaderInfo: systemd-boot {version} ####".encode()
            + bytes(8) + payload)


def lf(data: bytes | None, path: str = "x") -> LoaderFile:
    if data is None:
        return LoaderFile(path)
    return LoaderFile(path, loader.loader_info(data), hashlib.sha256(data).hexdigest())


def test_loader_module_uses_only_python3_minimal() -> None:
    tree = ast.parse(Path(loader.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        assert all(n.split(".")[0] in MINIMAL_MODULES for n in names), names


def test_loader_info_is_read_from_the_binary() -> None:
    assert loader.loader_info(sdboot(OLD)) == f"systemd-boot {OLD}"
    assert loader.loader_info(b"MZ shim, no magic") is None
    assert loader.info_version(f"systemd-boot {OLD}") == OLD


def test_rule() -> None:
    old, new, resigned = sdboot(OLD), sdboot(NEW), sdboot(OLD, b"signature")
    # The same bytes on both ESP paths: nothing to do.
    assert decide(lf(old), lf(old), lf(old), None, "2", None).state == "current"
    # A newer loader: both paths, the fallback last; only after a good boot.
    d = decide(lf(new), lf(old), lf(old), None, "2", None)
    assert (d.state, d.targets) == ("install", (PRIMARY, FALLBACK))
    d = decide(lf(new), lf(old), lf(old), None, "2", "this boot is still being tried")
    assert d.state == "pending" and "still being tried" in d.detail
    # Never a downgrade, blessed or not.
    d = decide(lf(old), lf(new), lf(new), None, "3", None)
    assert d.state == "kept" and "never downgraded" in d.detail and not d.targets
    # Same version, other bytes (re-signed): the newer image version wins.
    assert decide(lf(resigned), lf(old), lf(old), None, "3", None).state == "install"
    assert decide(lf(resigned), lf(old), lf(old), ("2", "x"), "3", None).state == "install"
    d = decide(lf(old), lf(resigned), lf(resigned), ("3", "x"), "1", None)
    assert d.state == "kept" and "newer 3" in d.detail
    # A fallback path that holds another loader (shim, say) is left alone; a missing one is
    # written again.
    shim = b"MZ" + bytes(100)
    assert decide(lf(new), lf(old), lf(shim), None, "2", None).targets == (PRIMARY,)
    assert decide(lf(old), lf(old), lf(shim), None, "2", None).state == "current"
    assert decide(lf(old), lf(old), lf(None), None, "2", None).targets == (FALLBACK,)
    assert decide(lf(None), lf(old), lf(old), None, "2", None).state == "none"


def make_esp(tmp_path: Path, data: bytes) -> Path:
    esp = tmp_path / "esp"
    for rel in (PRIMARY, FALLBACK):
        (esp / rel).parent.mkdir(parents=True, exist_ok=True)
        (esp / rel).write_bytes(data)
    return esp


def test_install_is_atomic_and_the_fallback_comes_last(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    old, new = sdboot(OLD, b"o" * 5000), sdboot(NEW, b"n" * 7000)
    esp = make_esp(tmp_path, old)
    (esp / (FALLBACK + ".new")).write_bytes(b"half a loader from an interrupted run")
    order: list[str] = []
    real_rename = os.rename

    def rename(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        order.append(Path(dst).relative_to(esp).as_posix())
        if len(order) == 3 and crash:
            raise OSError(28, "No space left on device")  # the fallback's rename fails
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    crash = True
    with pytest.raises(OSError):
        loader.install(esp, new, "2", (PRIMARY, FALLBACK))
    assert order == [STAMP, PRIMARY, FALLBACK]
    # Interrupted before the fallback's rename: each path holds a whole loader.
    assert (esp / PRIMARY).read_bytes() == new and (esp / FALLBACK).read_bytes() == old
    assert (esp / STAMP).read_text() == f"2 {hashlib.sha256(new).hexdigest()}\n"
    # The next run (the same version's next boot) finishes the job.
    state = decide(lf(new), lf(new), lf(old), loader.read_stamp(esp), "2", None)
    assert state == Decision("install", state.detail, (FALLBACK,))
    crash = False
    loader.install(esp, new, "2", state.targets)
    assert (esp / FALLBACK).read_bytes() == new
    assert sorted(p.name for p in esp.rglob("*.new")) == []


def fake_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, version: str,
                 booted: str, usr_loader: bytes, esp_loader: bytes) -> Path:
    """/usr runs `version`; the boot loader started the entry `booted` (v1 is demo_1.efi)."""
    esp = make_esp(tmp_path, esp_loader)
    write_uki(esp, "demo_1.efi", "1")
    if booted != "demo_1.efi":
        write_uki(esp, booted, version)
    efivars = tmp_path / "efivars"
    efivar(efivars, "LoaderEntrySelected", entries.parse_name(booted)[0])  # type: ignore[index]
    efivar(efivars, "LoaderInfo", f"systemd-boot {OLD}")
    usr = tmp_path / "usr/systemd-bootx64.efi"
    usr.parent.mkdir()
    usr.write_bytes(usr_loader)
    osrel = tmp_path / "os-release"
    osrel.write_text(f'IMAGE_ID=demo\nIMAGE_VERSION="{version}"\n')
    monkeypatch.setattr(loader, "EFIVARS", efivars)
    monkeypatch.setattr(loader, "OS_RELEASE", osrel)
    monkeypatch.setattr(loader, "USR_LOADERS", (tmp_path / "usr/none.signed", usr))
    monkeypatch.setattr(entries, "find_esp", lambda: esp)
    return esp


def machine(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = machine_main(list(args))
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    return code, out.out + out.err


def test_update_waits_for_a_good_boot_then_installs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    old, new = sdboot(OLD), sdboot(NEW)
    esp = fake_machine(tmp_path, monkeypatch, version="2", booted="demo_2+2-1.efi",
                       usr_loader=new, esp_loader=old)
    code, out = machine(capsys, "loader", "update", "--json")
    st = json.loads(out)
    assert code == 0 and st["state"] == "pending" and st["pending"] is True
    assert st["running"] == f"systemd-boot {OLD}" and st["usr"]["info"] == f"systemd-boot {NEW}"
    assert "still being tried" in st["detail"]
    assert (esp / PRIMARY).read_bytes() == old and (esp / FALLBACK).read_bytes() == old
    # systemd-bless-boot marked it good: the entry loses its counter.
    (esp / "EFI/Linux/demo_2+2-1.efi").rename(esp / "EFI/Linux/demo_2.efi")
    code, out = machine(capsys, "loader", "update")
    assert code == 0 and out.startswith(f"loader:     systemd-boot {OLD} running; ESP "
                                        f"systemd-boot {NEW} (installed by 2); installed")
    assert (esp / PRIMARY).read_bytes() == new and (esp / FALLBACK).read_bytes() == new
    code, out = machine(capsys, "loader", "--json")
    assert json.loads(out)["state"] == "current"


def test_a_soft_switch_is_not_a_good_boot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    fake_machine(tmp_path, monkeypatch, version="2", booted="demo_1.efi",
                 usr_loader=sdboot(NEW), esp_loader=sdboot(OLD))
    code, out = machine(capsys, "loader", "update", "--json")
    st = json.loads(out)
    assert code == 0
    assert st["state"] == "pending" and "without a firmware reboot from 1" in st["detail"]


def test_status_shows_the_loader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    esp = fake_machine(tmp_path, monkeypatch, version="3", booted="demo_3.efi",
                       usr_loader=sdboot(OLD), esp_loader=sdboot(NEW))
    st = loader.status_json(esp, "3", entries.list_entries(esp, loader.EFIVARS))
    assert st["state"] == "kept" and st["esp"]["info"] == f"systemd-boot {NEW}"
    assert loader.render(st) == (f"loader:     systemd-boot {OLD} running; ESP systemd-boot "
                                 f"{NEW}; this version's loader ({OLD}) is older than the "
                                 f"ESP's ({NEW}): kept, never downgraded")


def test_build_ships_the_spec_loader_and_masks_systemd_boot_update(tmp_path: Path) -> None:
    custom = tmp_path / "my-sdboot.efi"
    custom.write_bytes(sdboot(NEW))
    ctx = stage_ctx(tmp_path / "a", f'[system]\nid = "demo"\n[boot]\nloader = "{custom}"\n')
    assert ctx.tree is not None
    (ctx.tree / SDBOOT).parent.mkdir(parents=True)
    (ctx.tree / SDBOOT).write_bytes(sdboot(OLD))
    (ctx.tree / BOOT_UPDATE).parent.mkdir(parents=True)
    (ctx.tree / BOOT_UPDATE).write_text("[Service]\nExecStart=bootctl update\n")
    assert ship_loader(ctx) == ctx.tree / SDBOOT
    assert (ctx.tree / SDBOOT).read_bytes() == sdboot(NEW)
    assert os.readlink(ctx.tree / BOOT_UPDATE) == "/dev/null"
    unit = (ctx.tree / UNIT).read_text()
    assert "After=local-fs.target basic.target boot-complete.target systemd-bless-boot" in unit
    assert "ExecStart=/usr/bin/particle loader update" in unit
    assert "DefaultDependencies=no" in unit
    assert os.readlink(ctx.tree / "usr/lib/systemd/system/multi-user.target.wants" /
                       "particle-loader.service") == "../particle-loader.service"


def test_spec_loader_must_be_systemd_boot(run: Run, tmp_path: Path) -> None:
    (tmp_path / "shim.efi").write_bytes(b"MZ" + bytes(200))
    (tmp_path / "particle.toml").write_text(
        '[system]\nid = "demo"\n[boot]\nloader = "shim.efi"\n')
    code, out, err = run("validate")
    assert code == 2
    assert ("particle.toml: boot.loader: shim.efi is not a systemd-boot EFI binary "
            "(allowed: a systemd-bootx64.efi, signed or not)") in out + err
    (tmp_path / "particle.toml").write_text(
        '[system]\nid = "demo"\n[boot]\nloader = "gone.efi"\n')
    code, out, err = run("validate")
    assert code == 2 and "boot.loader: gone.efi does not exist" in out + err
