"""The headline claim of the builder, proven for real: a spec built from the Debian mirror
boots under UEFI in QEMU, /usr is verity-protected and read-only, the version is the built
one, and the root file system is writable and survives a reboot."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from particleos.disk import PartType, read_table
from particleos.vm import VM, VMOptions

from .conftest import BuildFn

pytestmark = pytest.mark.slow
VERSION = "1.0.0"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def image(build_image: BuildFn):  # type: ignore[no-untyped-def]
    return build_image("bootcheck", VERSION)


def checks(console: str) -> dict[str, str]:
    return dict(re.findall(r"PARTICLE-CHECK ([\w-]+)=(.*?)\r?\n", console))


def test_artifacts_and_layout(image) -> None:  # type: ignore[no-untyped-def]
    out = image.output_dir
    name = f"particle-minimal_{VERSION}"
    for suffix in (".raw", ".usr.raw", ".usr-verity.raw", ".efi", ".manifest.json"):
        assert (out / f"{name}{suffix}").is_file(), suffix
    # SHA256SUMS lists the update artifacts with their real digests.
    sums = dict(
        reversed(line.split("  ", 1)) for line in (out / "SHA256SUMS").read_text().splitlines()
    )
    for fname in (f"{name}.usr.raw", f"{name}.usr-verity.raw", f"{name}.efi"):
        assert sums[fname] == sha256(out / fname)
    manifest = json.loads((out / f"{name}.manifest.json").read_text())
    assert manifest["version"] == VERSION
    assert manifest["root_hash"] == image.root_hash
    assert "systemd" in manifest["packages"] and "less" in manifest["packages"]
    # The GPT follows the Discoverable Partitions Specification, slot B empty.
    parts = read_table(image.disk)
    types = [p["type"].lower() for p in parts]
    assert types[0] == str(PartType.ESP)
    assert types.count(str(PartType.USR)) == 2
    assert types.count(str(PartType.USR_VERITY)) == 2
    assert types[-1] == str(PartType.ROOT)
    usr = [p for p in parts if p["type"].lower() == str(PartType.USR)]
    assert [p["name"] for p in usr] == [name, "_empty"]
    # Partition UUIDs come from the root hash: that is how usrhash= finds the slot.
    rh = image.root_hash
    assert usr[0]["uuid"].lower().replace("-", "") == rh[:32]
    verity = [p for p in parts if p["type"].lower() == str(PartType.USR_VERITY)]
    assert verity[0]["uuid"].lower().replace("-", "") == rh[32:]
    # The hash tree in the disk is the one veritysetup accepts for that root hash.
    proc = subprocess.run(
        ["veritysetup", "verify", str(out / f"{name}.usr.raw"),
         str(out / f"{name}.usr-verity.raw"), rh],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    # The UKI pins this exact /usr.
    uki = (out / f"{name}.efi").read_bytes()
    assert f"usrhash={rh}".encode() in uki


def test_boots_with_verity_usr_and_persistent_root(image, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    log = tmp_path / "console.log"
    with VM(image.disk, VMOptions(snapshot=True, log=log, nic=["none"])) as vm:
        vm.expect(r"PARTICLE-CHECK done-first-boot", timeout=900)
        first = checks(vm.text())
        vm.expect(r"PARTICLE-CHECK done-second-boot", timeout=600)
        second = checks(vm.text().split("PARTICLE-CHECK done-first-boot", 1)[1])
        assert vm.wait(timeout=180) == 0
    assert first["system-state"] in ("running", "degraded"), first
    assert first["multi-user"] == "active"
    assert first["image-version"] == VERSION
    assert first["image-id"] == "particle-minimal"
    assert first["usr-source"] == "/dev/mapper/usr"
    assert first["usr-fstype"] == "erofs"
    assert first["usr-mount"] == "ro"
    assert first["usr-dm-name"] == "usr"
    assert first["usr-dm-uuid"].startswith("CRYPT-VERITY-")
    assert first["usr-write"] == "refused"
    assert first["root-fstype"] == "ext4"
    assert first["root-write"] == "ok"
    assert re.fullmatch(r"[0-9a-f]{32}", first["machine-id"])
    assert first["motd"].startswith("Welcome to particle-minimal")
    assert first["admin-user"] == "admin:/bin/bash"
    assert first["networkd"] == "enabled"
    assert first["serial-getty"] == "active"
    assert first["boot-count"] == "1"
    # Second boot: the root partition kept what the first boot wrote.
    assert second["boot-count"] == "2"
    assert second["persisted"] in ("running", "degraded")
    assert second["machine-id"] == first["machine-id"]



def test_bookworm_image_boots_through_the_cli(build_image: BuildFn) -> None:
    """The older supported release (systemd 252, dracut 059) goes through the same pipeline;
    booted with `particle qemu --expect`, as a user would."""
    result = build_image("bootcheck", "bw.1", overrides=["system.release=bookworm"])
    proc = subprocess.run(
        [sys.executable, "-m", "particleos", "qemu", str(result.output_dir), "--snapshot",
         "--expect", "PARTICLE-CHECK done-first-boot", "--timeout", "900"],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    first = checks(proc.stdout)
    assert first["multi-user"] == "active"
    assert first["image-version"] == "bw.1"
    assert first["usr-source"] == "/dev/mapper/usr"
    assert first["usr-mount"] == "ro"
    assert first["usr-dm-uuid"].startswith("CRYPT-VERITY-")
    assert first["usr-write"] == "refused"
    assert first["root-write"] == "ok"


def test_qemu_expect_fails_on_timeout(build_image: BuildFn) -> None:
    result = build_image("bootcheck", "bw.1", overrides=["system.release=bookworm"])
    proc = subprocess.run(
        [sys.executable, "-m", "particleos", "qemu", str(result.disk), "--snapshot",
         "--expect", "this never appears", "--timeout", "5"],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 1
    assert "timed out after 5 s" in proc.stderr
    assert "Traceback" not in proc.stderr
