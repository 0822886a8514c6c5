"""Unattended fallback from every kind of failed trial boot, on one machine with real boots.

v1 runs and installs v2 (3 tries). QEMU runs with -no-reboot, so every guest reboot ends the
QEMU process: the test sets the fault of each power-on before it starts the next one, and a
try that waited for a password (or for anything else) would show as a QEMU that never exits.
Try 1: bytes of v2's /usr partition flipped on the disk (restored afterwards): dm-verity
rejects it in the initrd. Try 2: the kernel panics (sysrq crash from a unit ordered before
boot-complete.target). Try 3: a unit required by boot-complete.target never finishes and the
trial deadline passes. Then v1 comes back by itself and `particle status` tells the three
tries. Last, the blessed v1 with a broken /etc/fstab keeps its emergency shell (no reboot loop).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from particleos import runner
from particleos.builder import BuildResult
from particleos.disk import PartType, read_table
from particleos.update.publish import publish
from particleos.vm import VM, VMOptions

from .conftest import BuildFn
from .guestshell import GuestShell
from .relay import user_nic
from .updateserver import UpdateServer

pytestmark = pytest.mark.slow

ID = "particle-minimal"
TRIES = 3  # [update] tries of tests/integration/specs/fallback
V1, V2 = "3.0.1", "3.0.2"
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


@pytest.fixture(scope="module")
def machine(build_image: BuildFn, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machine]:
    builds = {v: build_image("fallback", v) for v in (V1, V2)}
    d = tmp_path_factory.mktemp("fallback")
    disk = d / "disk.raw"
    runner.run(["cp", "--sparse=always", builds[V1].disk, disk], what="copy of the v1 disk")
    update_dir = d / "srv"
    update_dir.mkdir()
    with UpdateServer(update_dir) as server:
        m = Machine(d, builds, server, update_dir, disk, d / "efivars.fd")
        try:
            yield m
        finally:
            m.power_off()
            print(f"\nfallback test figures: {m.figures}")


@pytest.fixture(autouse=True)
def chained(machine: Machine, request: pytest.FixtureRequest) -> Iterator[None]:
    if machine.failed:
        pytest.skip(f"the machine is in an unknown state since {machine.failed} failed")
    failed_before = request.session.testsfailed
    yield
    if request.session.testsfailed > failed_before:
        machine.failed = request.node.name


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
    # Back to bad, so the blessed v1 stays what boots (the next test's subject).
    m.sh.out("particle rollback")
    assert next(e for e in m.status()["entries"] if e["version"] == V2)["state"] == "bad"


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
