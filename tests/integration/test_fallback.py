"""Unattended fallback from every kind of failed trial boot, on one machine with real boots.

v1 runs and installs v2 (3 tries). QEMU runs with -no-reboot, so every guest reboot ends the
QEMU process: the test sets the fault of each power-on before it starts the next one, and a
try that waited for a password (or for anything else) would show as a QEMU that never exits.
Try 1: bytes of v2's /usr partition flipped on the disk (restored afterwards): dm-verity
rejects it in the initrd. Try 2: the kernel panics (sysrq crash from a unit ordered before
boot-complete.target). Try 3: a unit required by boot-complete.target never finishes and the
trial deadline passes. Then v1 comes back by itself and `particle status` tells the three
tries. v2 carries another systemd-boot than v1 (the same build signed with a throwaway Secure
Boot key, `[boot] loader`), which never reaches the ESP since v2 never booted good; v3 carries it
too, boots good, and its loader replaces v1's on the ESP; the next boot starts from it. Last,
the blessed v3 with a broken /etc/fstab keeps its emergency shell (no reboot loop).
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from particleos import runner
from particleos.builder import BuildResult
from particleos.disk import PartType, read_table
from particleos.keys import self_signed_certificate
from particleos.machine.loader import FALLBACK, PRIMARY
from particleos.secureboot import pe_signer_certificates
from particleos.signing import sbsign
from particleos.tools import ToolsTree
from particleos.update.publish import publish
from particleos.vm import VM, VMOptions

from .chain import chain_step
from .conftest import BuildFn
from .guestshell import GuestShell
from .relay import user_nic
from .updateserver import UpdateServer

pytestmark = pytest.mark.slow

ID = "particle-minimal"
TRIES = 3  # [update] tries of tests/integration/specs/fallback
V1, V2, V3 = "3.0.1", "3.0.2", "3.0.3"
BOOT_TIMEOUT = 600
FLIP_OFFSET = 1024  # the erofs superblock, in the first data block dm-verity checks
FLIP = b"\xff\x00\xa5"


@dataclass
class Machine:
    dir: Path
    builds: dict[str, BuildResult]
    server: UpdateServer
    update_dir: Path
    disk: Path
    vars: Path
    loaders: dict[str, bytes] = field(default_factory=dict)  # v1's systemd-boot, v2/v3's
    loader_cert: x509.Certificate | None = None  # what signed v2/v3's
    vm: VM | None = None
    sh: GuestShell | None = None
    console: str = ""  # every finished power-on's console, in order
    failed: str | None = None
    figures: dict[str, Any] = field(default_factory=dict)

    def power_on(self, fault: str | None = None) -> VM:
        """A new QEMU process on the same disk and UEFI variables; it exits when the guest
        reboots or powers off."""
        assert self.vm is None
        extra = ["-fw_cfg", f"name=opt/particle/fault,string={fault}"] if fault else []
        opts = VMOptions(nic=[user_nic(self.server.port)], vars_file=self.vars,
                         log=self.dir / "console.log", reboot=False, extra=extra)
        self.vm = VM(self.disk, opts).start()
        self.sh = GuestShell(self.vm)
        return self.vm

    def ended(self, timeout: float) -> str:
        """Wait until QEMU exits by itself (the guest rebooted); returns that boot's console."""
        assert self.vm is not None
        self.vm.wait(timeout)
        text = self.vm.text()
        self.vm.close()
        self.vm, self.sh = None, None
        self.console += text
        return text

    def power_off(self) -> None:
        if self.vm is not None:
            self.console += self.vm.text()
            self.vm.close()
        self.vm, self.sh = None, None

    def status(self) -> dict[str, Any]:
        assert self.sh is not None
        st: dict[str, Any] = self.sh.json("particle status --json")
        return st


def esp_file(disk: Path, path: str, dest: Path) -> bytes:
    """A file of the disk image's ESP, read from the host (mtools)."""
    esp = next(p for p in read_table(disk) if p["type"].lower() == str(PartType.ESP))
    dest.unlink(missing_ok=True)
    runner.run(["mcopy", "-n", "-i", f"{disk}@@{int(esp['start']) * 512}", f"::/{path}", dest],
               what=f"mcopy of {path}")
    return dest.read_bytes()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def signed_loader(v1_disk: Path, d: Path) -> tuple[bytes, Path, x509.Certificate]:
    """v1's systemd-boot, Secure Boot-signed with a throwaway key: the same LoaderInfo
    version, other bytes (as a loader re-signed with a rotated key is)."""
    unsigned = esp_file(v1_disk, PRIMARY, d / "systemd-bootx64.efi")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = self_signed_certificate(key, "particle loader test", 30)
    (d / "loader.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    (d / "loader.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    signed = sbsign(ToolsTree(), d / "loader.key", d / "loader.crt", d / "systemd-bootx64.efi",
                    d / "signed-systemd-bootx64.efi")
    return unsigned, signed, cert


@pytest.fixture(scope="module")
def machine(build_image: BuildFn, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machine]:
    builds = {V1: build_image("fallback", V1)}
    d = tmp_path_factory.mktemp("fallback")
    unsigned, signed, cert = signed_loader(builds[V1].disk, d)
    for v in (V2, V3):
        builds[v] = build_image("fallback", v, [f"boot.loader={signed}"])
    disk = d / "disk.raw"
    runner.run(["cp", "--sparse=always", builds[V1].disk, disk], what="copy of the v1 disk")
    update_dir = d / "srv"
    update_dir.mkdir()
    with UpdateServer(update_dir) as server:
        m = Machine(d, builds, server, update_dir, disk, d / "efivars.fd",
                    loaders={V1: unsigned, V3: signed.read_bytes()}, loader_cert=cert)
        try:
            yield m
        finally:
            m.power_off()
            print(f"\nfallback test figures: {m.figures}")


@pytest.fixture(autouse=True)
def chained(machine: Machine, request: pytest.FixtureRequest) -> Iterator[None]:
    yield from chain_step(machine, request)


def usr_partition_offset(disk: Path, version: str) -> int:
    """Byte offset of the usr partition labelled ID_VERSION on the disk image."""
    for p in read_table(disk):
        if p["type"].lower() == str(PartType.USR) and p.get("name") == f"{ID}_{version}":
            return int(p["start"]) * 512
    raise AssertionError(f"no usr partition of {version} on {disk}: {read_table(disk)}")


def flip(disk: Path, offset: int, data: bytes) -> bytes:
    with open(disk, "r+b") as f:
        f.seek(offset)
        old = f.read(len(data))
        f.seek(offset)
        f.write(data)
    return old


def test_v2_fails_three_ways_and_v1_comes_back_by_itself(machine: Machine) -> None:
    m = machine
    vm = m.power_on()
    assert m.sh is not None
    m.sh.login(BOOT_TIMEOUT)
    st = m.status()
    assert st["version"] == V1 and st["failed_tries"] == []
    loader = st["loader"]
    assert loader["state"] == "current" and loader["running"].startswith("systemd-boot ")
    assert loader["esp"]["sha256"] == loader["fallback"]["sha256"] == sha(m.loaders[V1])
    assert m.sh.out("systemctl is-enabled systemd-boot-update.service || true") == "masked"
    # A blessed boot gets none of the trial machinery, but the panic timeout is always set.
    assert "panic=5" in m.sh.out("cat /proc/cmdline")
    assert m.sh.out("systemctl is-active particle-trial.service || true") == "inactive"
    publish(m.builds[V1].output_dir, m.update_dir, keep=3)
    publish(m.builds[V2].output_dir, m.update_dir, keep=3)
    m.sh.run("particle update", timeout=900)
    assert f"{ID}_{V2}+{TRIES}-0.efi" in m.sh.out("ls /boot/EFI/Linux")
    m.sh.start("systemctl reboot")
    m.ended(300)

    # Try 1: /usr of v2 corrupted on disk while the machine is off.
    offset = usr_partition_offset(m.disk, V2) + FLIP_OFFSET
    saved = flip(m.disk, offset, FLIP)
    t0 = time.monotonic()
    try:
        m.power_on()
        log = m.ended(BOOT_TIMEOUT)
    finally:
        flip(m.disk, offset, saved)
    m.figures["try_usr_corrupt_s"] = round(time.monotonic() - t0)
    assert re.search(rf"{re.escape(ID)}_{re.escape(V2)}\+{TRIES - 1}-1\.efi \d+ emergency usr:",
                     log), "no emergency record of v2's first try"
    assert "verity" in log.lower()
    assert "Give root password" not in log and "root account is locked" not in log

    # Try 2: the kernel panics (a unit ordered before boot-complete.target crashes it).
    t0 = time.monotonic()
    m.power_on("panic")
    log = m.ended(BOOT_TIMEOUT)
    m.figures["try_panic_s"] = round(time.monotonic() - t0)
    assert "sysrq: Trigger a crash" in log and "Kernel panic" in log
    assert re.search(rf"{re.escape(ID)}_{re.escape(V2)}\+{TRIES - 2}-2\.efi \d+ root ", log)

    # Try 3: a unit required by boot-complete.target never finishes: the deadline reboots.
    t0 = time.monotonic()
    m.power_on("hang")
    log = m.ended(BOOT_TIMEOUT)
    m.figures["try_hang_s"] = round(time.monotonic() - t0)
    assert "PARTICLE-FAULT fault=hang" in log
    assert re.search(rf"{re.escape(ID)}_{re.escape(V2)}\+0-3\.efi \d+ timeout ", log), \
        "no timeout record of v2's third try"

    # No tries left: v1 boots by itself (no fault configured, none needed).
    t0 = time.monotonic()
    vm = m.power_on()
    assert m.sh is not None
    m.sh.login(BOOT_TIMEOUT)
    m.figures["v1_back_s"] = round(time.monotonic() - t0)
    assert "particle-trial:" not in vm.text()  # v1 is blessed: no trial machinery
    st = m.status()
    assert st["version"] == V1
    bad = next(e for e in st["entries"] if e["version"] == V2)
    assert bad["state"] == "bad" and bad["tries_done"] == TRIES and not bad["default"]
    tries = st["failed_tries"]
    assert [t["version"] for t in tries] == [V2] * TRIES
    assert [t["try"] for t in tries] == [1, 2, 3]
    assert tries[0]["reason"] == "usr-setup"
    assert tries[1]["reason"] in ("panic", "crash")
    assert tries[2]["reason"] == "timeout" and "particle-fault.service" in tries[2]["how"]
    assert bad["failures"] == tries
    m.figures["try_2_reason"] = tries[1]["reason"]
    text = m.sh.out("particle status")
    assert f"failed:     {V2} try 1" in text and "/usr could not be set up" in text
    # v2's loader (the signed one) never reached the ESP: v2 never booted good.
    assert st["loader"]["state"] == "current"
    assert st["loader"]["esp"]["sha256"] == st["loader"]["fallback"]["sha256"] == \
        sha(m.loaders[V1]) != sha(m.loaders[V3])
    # Estimated power-on to v1 for a version that failed the same way every time.
    for case in ("usr_corrupt", "panic", "hang"):
        m.figures[f"{case}_to_v1_back_s"] = TRIES * m.figures[f"try_{case}_s"] + \
            m.figures["v1_back_s"]


def test_owner_can_give_a_bad_version_its_tries_again(machine: Machine) -> None:
    m = machine
    assert m.sh is not None
    out = m.sh.out(f"particle retry {V2}")
    assert f"{V2} gets {TRIES} tries again" in out
    st = m.status()
    again = next(e for e in st["entries"] if e["version"] == V2)
    assert again["state"] == "pending" and again["tries_left"] == TRIES and again["default"]
    assert st["failed_tries"] == []
    # Back to bad, so the blessed v1 stays what boots (v3 comes next).
    m.sh.out("particle rollback")
    assert next(e for e in m.status()["entries"] if e["version"] == V2)["state"] == "bad"


def test_a_good_version_brings_its_boot_loader(machine: Machine) -> None:
    m = machine
    assert m.sh is not None
    publish(m.builds[V3].output_dir, m.update_dir, keep=3)
    m.sh.run("particle update", timeout=900)
    st = m.status()
    assert st["pending"] == V3 and st["loader"]["state"] == "current"  # still v1's, and v1's
    m.sh.start("systemctl reboot")
    m.ended(300)

    t0 = time.monotonic()
    m.power_on()
    m.sh.login(BOOT_TIMEOUT)
    m.figures["v3_first_boot_s"] = round(time.monotonic() - t0)
    # particle-loader.service runs after systemd-bless-boot.service: wait for the boot's jobs.
    m.sh.run("systemctl is-system-running --wait", timeout=600, check=False)
    st = m.status()
    assert st["version"] == V3 and st["boot_assessment"]["marked_good"]
    loader = st["loader"]
    assert loader["state"] == "current" and loader["installed_by"] == V3
    assert loader["usr"]["path"].endswith("/systemd-bootx64.efi")
    assert loader["esp"]["sha256"] == loader["fallback"]["sha256"] == sha(m.loaders[V3])
    assert loader["esp"]["info"] == loader["running"]  # same systemd-boot version, re-signed
    journal = m.sh.out("journalctl -b -o cat --no-pager -u systemd-bless-boot.service "
                       "-u particle-loader.service")
    assert "installed systemd-boot" in journal and "it starts the next boot" in journal
    assert f"ESP {loader['esp']['info']} (installed by {V3})" in m.sh.out("particle status")
    m.sh.start("systemctl reboot")
    m.ended(300)

    # From the host: both ESP paths hold v3's loader, signed by the throwaway key.
    for path in (PRIMARY, FALLBACK):
        data = esp_file(m.disk, path, m.dir / "esp-loader.efi")
        assert data == m.loaders[V3], path
        assert pe_signer_certificates(data) == [m.loader_cert]
    # The firmware starts the new loader, which boots v3 to multi-user.
    t0 = time.monotonic()
    m.power_on()
    m.sh.login(BOOT_TIMEOUT)
    m.figures["boot_with_new_loader_s"] = round(time.monotonic() - t0)
    m.sh.run("systemctl is-system-running --wait", timeout=600, check=False)
    assert m.sh.out("systemctl is-active multi-user.target") == "active"
    st = m.status()
    assert st["version"] == V3 and st["loader"]["state"] == "current"
    assert st["loader"]["running"] == st["loader"]["esp"]["info"]
    assert "ESP has this version's loader" in m.sh.out(
        "journalctl -b -o cat --no-pager -u particle-loader.service")


def test_blessed_version_keeps_its_emergency_shell(machine: Machine) -> None:
    m = machine
    assert m.sh is not None
    m.sh.out("echo '/dev/disk/by-label/particle-missing /mnt/missing ext4 "
             "x-systemd.device-timeout=5s 0 2' >> /etc/fstab")
    m.sh.start("systemctl reboot")
    m.ended(300)
    vm = m.power_on()
    vm.expect(r"You are in emergency mode|Cannot open access to console|emergency mode",
              BOOT_TIMEOUT)
    seen = time.monotonic()
    time.sleep(60)
    assert vm.running(), "the blessed version rebooted instead of offering its shell"
    text = vm.text()
    assert text.count("Linux version") == 1
    assert "particle-trial:" not in text
    m.figures["blessed_emergency_held_s"] = round(time.monotonic() - seen)
    m.power_off()
