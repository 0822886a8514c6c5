"""System extensions without a VM: the identity an extension carries and the rules that refuse
it on another base, the /usr diff that decides what it contains, the root hash the machine
derives from an image, transfer files, and the errors of both CLIs."""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from particleos.cli import cli
from particleos.disk import ATTR_READ_ONLY, Partition, PartType, write_disk
from particleos.ext.builder import _module_path
from particleos.ext.diff import copy_selection, diff_usr
from particleos.ext.release import extension_release_text
from particleos.machine import cli as machine_cli
from particleos.machine import ext as machine_ext
from particleos.machine.overlay import overlay_active
from particleos.machine.sysext import (
    ExtensionError,
    artifact_name,
    compatibility_problems,
    extension_transfer,
    missing_extensions,
    parse_artifact_name,
    parse_release,
    read_image,
    sysext_level,
)
from particleos.verity import format_verity, verity_uuids

BASE = {
    "ID": "debian", "VERSION_ID": "13", "IMAGE_ID": "demo", "IMAGE_VERSION": "1.0.0",
    "SYSEXT_LEVEL": "demo-1.0.0",
}


# ---------------------------------------------------------------------------- identity


def test_extension_release_matches_its_base() -> None:
    fields = parse_release(extension_release_text("devtools", BASE, ["gcc", "make"]))
    assert fields["ID"] == "debian" and fields["VERSION_ID"] == "13"
    assert fields["SYSEXT_LEVEL"] == "demo-1.0.0"
    assert (fields["IMAGE_ID"], fields["IMAGE_VERSION"]) == ("demo", "1.0.0")
    assert fields["ARCHITECTURE"] == "x86-64" and "EXTENSION_RELOAD_MANAGER" not in fields
    with_units = extension_release_text("svc", BASE, ["nginx"], reload_manager=True)
    assert parse_release(with_units)["EXTENSION_RELOAD_MANAGER"] == "1"
    assert fields["PARTICLE_PACKAGES"] == "gcc make"
    assert compatibility_problems(fields, BASE, "x86-64") == []


def test_extension_release_needs_an_identified_base() -> None:
    with pytest.raises(ValueError, match="IMAGE_VERSION"):
        extension_release_text("x", {"ID": "debian", "VERSION_ID": "13", "IMAGE_ID": "a"}, [])


def test_sysext_level_is_the_exact_identity() -> None:
    assert sysext_level("demo", "1.0.0") == "demo-1.0.0"
    mangled = sysext_level("Demo", "2~rc1")
    assert mangled.startswith("demo-2_rc1.") and mangled != sysext_level("demo", "2^rc1")
    assert all(c.islower() or c.isdigit() or c in "._-" for c in mangled)


def test_other_base_version_is_refused_with_both_names() -> None:
    ext = parse_release(extension_release_text("x", {**BASE, "IMAGE_VERSION": "1.0.1",
                                                     "SYSEXT_LEVEL": "demo-1.0.1"}, []))
    problems = compatibility_problems(ext, BASE, "x86-64")
    assert problems == ["it was built for demo 1.0.1, this machine runs demo 1.0.0"]


def test_other_os_arch_and_version_id_are_refused() -> None:
    ext = {"ID": "fedora", "VERSION_ID": "40", "ARCHITECTURE": "arm64"}
    problems = compatibility_problems(ext, BASE, "x86-64")
    assert any("architecture arm64" in p for p in problems)
    assert any("OS fedora" in p for p in problems)
    # Without SYSEXT_LEVEL on either side, VERSION_ID decides, as in systemd-sysext.
    assert compatibility_problems({"ID": "debian", "VERSION_ID": "12"},
                                  {"ID": "debian", "VERSION_ID": "13"}) \
        == ["it is for VERSION_ID 12, this machine has 13"]
    assert compatibility_problems({"ID": "_any"}, BASE, "x86-64") == []


def test_artifact_names_round_trip() -> None:
    name = artifact_name("demo", "dev-tools", "1.2~rc1")
    assert name == "demo-dev-tools_1.2~rc1.raw"
    assert parse_artifact_name(name, "demo") == ("dev-tools", "1.2~rc1")
    assert parse_artifact_name("demo_1.0.usr.raw", "demo") is None
    assert parse_artifact_name("other-x_1.raw", "demo") is None


# ---------------------------------------------------------------------------- the diff


def _file(path: Path, data: str, mode: int = 0o644, mtime: int = 1_000_000) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data)
    os.chmod(path, mode)
    os.utime(path, (mtime, mtime))


def test_diff_keeps_only_what_packages_add_or_change(tmp_path: Path) -> None:
    base, new = tmp_path / "base", tmp_path / "new"
    for root in (base, new):
        _file(root / "bin/bash", "bash")
        _file(root / "lib/os-release", "ID=debian\n")
        _file(root / "lib/libc.so", "libc")
        _file(root / "bin/tool", "tool", mode=0o755)
        _file(root / "share/same-size", "aaaa")
        (root / "lib/link").symlink_to("libc.so")
    _file(base / "share/gone", "removed by a package")
    _file(new / "bin/gcc", "gcc", mode=0o755)  # added
    _file(new / "lib/gcc/x86_64/14/cc1", "cc1")  # added, in new directories
    _file(new / "lib/libc.so", "LIBC", mtime=2_000_000)  # same size, new content
    os.chmod(new / "bin/tool", 0o700)  # mode change
    _file(new / "share/same-size", "aaaa", mtime=3_000_000)  # touched, same content
    (new / "lib/link").unlink()
    (new / "lib/link").symlink_to("libc.so.6")  # retargeted
    _file(new / "lib/os-release", "ID=other\n", mtime=5)  # never shipped
    diff = diff_usr(base, new)
    assert diff.added == ["bin/gcc", "lib/gcc", "lib/gcc/x86_64", "lib/gcc/x86_64/14",
                          "lib/gcc/x86_64/14/cc1"]
    assert diff.changed == ["bin/tool", "lib/libc.so", "lib/link", "lib/os-release"]
    assert diff.removed == ["share/gone"]
    assert "lib/os-release" not in diff.kept()

    stage = tmp_path / "stage"
    stage.mkdir()
    copied = copy_selection(new, stage, diff.kept())
    assert copied == len("gcc") + len("cc1") + len("tool") + len("LIBC")
    assert (stage / "lib/gcc/x86_64/14/cc1").read_text() == "cc1"
    assert os.readlink(stage / "lib/link") == "libc.so.6"
    assert (stage / "bin/gcc").stat().st_mode & 0o777 == 0o755
    assert (stage / "bin/tool").stat().st_mode & 0o777 == 0o700
    assert not (stage / "bin/bash").exists() and not (stage / "lib/os-release").exists()


def test_module_paths_of_a_dkms_extension() -> None:
    k = "6.12.1-cloud-amd64"
    assert _module_path(f"lib/modules/{k}/updates/dkms/x.ko.xz", k)
    assert _module_path(f"lib/modules/{k}/modules.dep.bin", k)
    assert not _module_path(f"lib/modules/{k}/build", k)
    assert not _module_path("lib/gcc/x86_64-linux-gnu/14/cc1", k)
    assert not _module_path(f"src/linux-headers-{k}/Makefile", k)


# ---------------------------------------------------------------------------- the image


def _ddi(tmp_path: Path, *, swap_uuids: bool = False) -> tuple[Path, str]:
    data = tmp_path / "usr.img"
    data.write_bytes(hashlib.sha256(b"x").digest() * 4096)  # 128 KiB, 32 blocks
    tree = tmp_path / "usr.verity"
    result = format_verity(data, tree, salt=b"salty")
    usr_uuid, verity_uuid = verity_uuids(result.root_hash)
    if swap_uuids:
        usr_uuid, verity_uuid = verity_uuid, usr_uuid
    image = tmp_path / "demo-x_1.raw"
    write_disk(image, [
        Partition("x", PartType.USR, usr_uuid, data.stat().st_size, data, (ATTR_READ_ONLY,)),
        Partition("x", PartType.USR_VERITY, verity_uuid, 8192, tree, (ATTR_READ_ONLY,)),
    ], disk_uuid=uuid.uuid4())
    return image, result.root_hash.hex()


def test_machine_derives_the_root_hash_from_the_image(tmp_path: Path) -> None:
    image, root_hash = _ddi(tmp_path)
    info = read_image(image)
    assert info.root_hash == root_hash and not info.signed


def test_image_with_foreign_partition_uuids_is_rejected(tmp_path: Path) -> None:
    image, _ = _ddi(tmp_path, swap_uuids=True)
    with pytest.raises(ExtensionError, match="do not match the verity root hash"):
        read_image(image)
    plain = tmp_path / "plain.raw"
    plain.write_bytes(bytes(4096))
    with pytest.raises(ExtensionError, match="no GPT"):
        read_image(plain)


# ---------------------------------------------------------------------------- updates


def test_extension_transfer_follows_the_base_source() -> None:
    text = extension_transfer("demo", "devtools", "url-file", "https://u.example/demo/")
    assert "MatchPattern=demo-devtools_@v.raw" in text
    assert "Type=url-file\nPath=https://u.example/demo/" in text
    assert "Path=/var/lib/particle/extensions" in text and "InstancesMax=3" in text
    published = {"demo_2.efi", "demo-devtools_2.raw"}
    assert missing_extensions(published, "demo", "2", ["devtools", "dkms"]) == ["dkms"]


# ---------------------------------------------------------------------------- CLIs


@pytest.fixture
def machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The machine-side paths redirected into tmp_path."""
    os_release = tmp_path / "os-release"
    os_release.write_text("".join(f'{k}="{v}"\n' for k, v in BASE.items()))
    for attr, value in {
        "OS_RELEASE": os_release, "EXTENSIONS_DIR": tmp_path / "extensions",
        "STORE_DIR": tmp_path / "store", "TRANSFER_DIR": tmp_path / "sysupdate.d",
        "VENDOR_TRANSFER_DIR": tmp_path / "vendor", "MERGED_LIST": tmp_path / "merged",
    }.items():
        monkeypatch.setattr(machine_ext, attr, value)
    monkeypatch.delenv("PARTICLE_UPDATE_SOURCE", raising=False)
    return tmp_path


def run_machine(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = machine_cli.main(argv)
    out = capsys.readouterr()
    return rc, out.out + out.err


def test_machine_remove_of_unknown_extension(machine: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = run_machine(["ext", "remove", "nosuch"], capsys)
    assert rc == 1 and "extension nosuch is not installed" in out


def test_machine_add_by_name_needs_an_update_source(machine: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = run_machine(["ext", "add", "devtools"], capsys)
    assert rc == 1 and "no update source" in out and "path or URL" in out
    assert not list((machine / "store").glob("*.raw"))


def test_machine_add_checks_the_digest(machine: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    src.mkdir()
    image = src / "demo-devtools_1.0.0.raw"
    image.write_bytes(b"not what was published")
    rc, out = run_machine(["ext", "add", str(image)], capsys)
    assert rc == 1 and "no SHA256SUMS" in out and "--no-verify" in out
    (src / "SHA256SUMS").write_text(f"{'0' * 64}  {image.name}\n")
    rc, out = run_machine(["ext", "add", str(image)], capsys)
    assert rc == 1 and "does not match" in out and "nothing was installed" in out
    # By name, from the image's update source (found in its sysupdate transfer files).
    vendor = machine / "vendor"
    vendor.mkdir()
    (vendor / "10-usr.transfer").write_text(f"[Source]\nType=regular-file\nPath={src}\n")
    rc, out = run_machine(["ext", "add", "devtools"], capsys)
    assert rc == 1 and "does not match" in out
    assert not list((machine / "store").glob("*.raw"))


def test_machine_list_and_usage(machine: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = run_machine(["ext", "list"], capsys)
    assert rc == 0 and "no extensions installed" in out
    rc, out = run_machine(["--json", "ext", "list"], capsys)
    assert rc == 0 and out.strip() == "[]"
    rc, out = run_machine(["ext"], capsys)
    assert rc == 2 and "add" in out and "remove" in out


def test_overlay_is_recognised_from_mountinfo(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    usr = "30 1 254:0 / /usr ro,relatime shared:2 - erofs /dev/mapper/usr ro\n"
    info.write_text(usr)
    assert not overlay_active(info)
    info.write_text(usr + "90 30 0:50 / /usr rw,relatime shared:40 - overlay particle-overlay "
                    "rw,lowerdir=/usr,upperdir=/run/particle/overlay/upper\n")
    assert overlay_active(info)
    assert not overlay_active(tmp_path / "missing")


def test_host_ext_build_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["ext", "build", "--base", str(tmp_path), "devtools", "gcc"])
    assert result.exit_code != 0
    assert "no build here" in str(result.exception)
    result = runner.invoke(cli, ["ext", "build", "--base", str(tmp_path), "bad_name", "gcc"])
    assert "bad extension name" in str(result.exception)
    result = runner.invoke(cli, ["ext", "build", "--base", str(tmp_path), "devtools"])
    assert result.exit_code == 2 and "PACKAGES" in result.output


def test_machine_modules_use_only_what_python3_minimal_ships() -> None:
    """The image has python3-minimal: no shutil, uuid, tempfile or http client (a missing
    module only shows as a traceback on the machine)."""
    import ast

    import particleos.machine as pkg

    missing = {"shutil", "uuid", "tempfile", "urllib", "http", "email", "socket", "ssl"}
    for name in ("sysext", "ext", "overlay"):
        path = Path(pkg.__file__).parent / f"{name}.py"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module]
            else:
                continue
            assert not {m.split(".")[0] for m in mods} & missing, (name, mods)


def test_transfers_for_the_update_code() -> None:
    from particleos.ext.transfer import extension_transfers, held_back_message

    files = extension_transfers("demo", ["devtools"], "https://u.example/demo")
    assert list(files) == ["05-particle-ext-devtools.transfer"]
    assert "Type=url-file\nPath=https://u.example/demo/" in files[
        "05-particle-ext-devtools.transfer"]
    local = extension_transfers("demo", ["devtools"], "/srv/updates")
    assert "Type=regular-file\nPath=/srv/updates" in local["05-particle-ext-devtools.transfer"]
    msg = held_back_message("demo", "2", ["dkms"])
    assert "held back" in msg and "demo-dkms_2.raw" in msg
