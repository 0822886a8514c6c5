"""An encrypted root sealed to the TPM2, for real (`[image] encrypt = "tpm2"`, specs/encrypted):
one disk, three boots under QEMU with swtpm as the TPM.

1. A fresh TPM: the first boot creates root as LUKS2 enrolled to the TPM (a systemd-tpm2
   token bound to PCR 7), / is dm-crypt, the recovery key is printed once, `particle status`
   says how root unlocks; a file is written.
2. The same TPM: no prompt, the file is still there, no second recovery key. Then a factory
   reset: the reboot makes a new LUKS2 volume sealed to the same TPM and shows a new recovery
   key; the file is gone; a new one is written.
3. A fresh, empty TPM: the disk does not unlock (the passphrase prompt, not a login); the
   recovery key from the reset typed at the prompt unlocks it and the new file is there.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from particleos.builder import BuildResult
from particleos.disk import PartType, read_table
from particleos.vm import VM, VMOptions

from .chain import chain_step
from .conftest import BuildFn
from .guestshell import GuestShell

pytestmark = pytest.mark.slow
VERSION = "1.0.0"
RECOVERY_KEY = re.compile(rb"RECOVERY KEY of the encrypted root \((/dev/\w+)\):\s+"
                          rb"([cbdefghijklnrtuv]{8}(?:-[cbdefghijklnrtuv]{8}){7})")
# systemd-cryptsetup asks for the recovery key by name when the volume has one.
PASSPHRASE_PROMPT = r"Please enter (?:passphrase|recovery key) for disk root"
MARK = "sealed-to-the-tpm"
# The device-mapper target of a mapping, as its UUID says (CRYPT-LUKS2-..., CRYPT-VERITY-...).
DM_UUID = "cat /sys/class/block/$(basename $(readlink -f /dev/mapper/{}))/dm/uuid"


@dataclass
class Machine:
    image: BuildResult
    disk: Path
    tmp: Path
    recovery_key: str | None = None
    luks_device: str | None = None
    boot_seconds: dict[str, float] = field(default_factory=dict)
    failed: str | None = None

    def boot(self, tpm: Path, name: str) -> VM:
        opts = VMOptions(tpm=tpm, log=self.tmp / f"console-{name}.log")
        return VM(self.disk, opts)


@pytest.fixture(scope="module")
def machine(build_image: BuildFn, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machine]:
    image = build_image("encrypted", VERSION)
    m = Machine(image, image.disk, tmp_path_factory.mktemp("encrypted"))
    yield m
    if m.boot_seconds:
        print("\nencrypted root, seconds from power-on: "
              + ", ".join(f"{k} {v:.0f}" for k, v in m.boot_seconds.items()))


@pytest.fixture(autouse=True)
def chained(machine: Machine, request: pytest.FixtureRequest) -> Iterator[None]:
    yield from chain_step(machine, request)


def test_image_has_no_root_partition(machine: Machine) -> None:
    """The root is made on the machine: the image ends with slot B and free space for it."""
    types = [p["type"].lower() for p in read_table(machine.disk)]
    assert str(PartType.ROOT) not in types
    assert types[-1] == str(PartType.USR)


def test_first_boot_creates_a_root_sealed_to_the_tpm(machine: Machine) -> None:
    start = time.monotonic()
    with machine.boot(machine.tmp / "tpm", "1") as vm:
        m = vm.expect(RECOVERY_KEY, 900)
        machine.luks_device, machine.recovery_key = (g.decode() for g in m.groups())
        sh = GuestShell(vm)
        sh.login(600)
        machine.boot_seconds["first boot (root created)"] = time.monotonic() - start
        assert sh.out("findmnt -no SOURCE /") == "/dev/mapper/root"
        assert sh.out(DM_UUID.format("root")).startswith("CRYPT-LUKS2-")
        assert sh.out(f"lsblk -dno FSTYPE {machine.luks_device}") == "crypto_LUKS"
        dump = sh.out(f"cryptsetup luksDump {machine.luks_device}")
        assert "Version:       \t2" in dump
        tokens = dump.split("Tokens:", 1)[1]
        assert "systemd-tpm2" in tokens and "systemd-recovery" in tokens
        assert re.search(r"tpm2-hash-pcrs:\s+7\s", tokens), tokens
        status = sh.json("particle status --json")
        assert status["root"] | {"keyslots": None} == {
            "encrypted": True, "device": machine.luks_device, "type": "LUKS2",
            "tpm2": True, "tpm2_pcrs": [7], "recovery_key": True, "keyslots": None,
            "unlock": ["tpm2 (PCR 7)", "recovery key"]}
        assert "unlocks with tpm2 (PCR 7), recovery key" in sh.out("particle status")
        # /usr stays dm-verity, not encrypted.
        assert sh.out("findmnt -no SOURCE /usr") == "/dev/mapper/usr"
        assert sh.out(DM_UUID.format("usr")).startswith("CRYPT-VERITY-")
        sh.run(f"echo {MARK} > /root/mark && sync")
        sh.start("poweroff")
        vm.wait(300)
    assert len(RECOVERY_KEY.findall(vm.console)) == 1  # shown once


def test_same_tpm_unlocks_then_a_reset_seals_a_new_root(machine: Machine) -> None:
    assert machine.recovery_key is not None and machine.luks_device is not None
    start = time.monotonic()
    with machine.boot(machine.tmp / "tpm", "2") as vm:
        sh = GuestShell(vm)
        sh.login(600)
        machine.boot_seconds["second boot"] = time.monotonic() - start
        assert sh.out("cat /root/mark") == MARK
        assert sh.out("findmnt -no SOURCE /") == "/dev/mapper/root"
        # Its recovery key was made at the first boot: the unit's condition skips it now.
        assert sh.out("systemctl show -P ConditionResult particle-recovery-key.service") == "no"
        console = vm.text()
        assert re.search(PASSPHRASE_PROMPT, console) is None
        assert "RECOVERY KEY" not in console  # made once, at the first boot only
        # A factory reset replaces the volume: repart makes a new one in the initrd, which is
        # unlocked only after it (it was unlocked before, with the old volume's key: emergency).
        old_uuid = sh.out(f"cryptsetup luksUUID {machine.luks_device}")
        sh.start("particle factory-reset --yes --reboot")
        vm.expect(r"particle: switching now", 120)
        start = time.monotonic()
        m = vm.expect(RECOVERY_KEY, 900)
        device, key = (g.decode() for g in m.groups())
        sh.login(600)
        machine.boot_seconds["factory reset"] = time.monotonic() - start
        assert device == machine.luks_device and key != machine.recovery_key
        assert sh.out(f"cryptsetup luksUUID {device}") != old_uuid
        assert sh.out("findmnt -no SOURCE /") == "/dev/mapper/root"
        assert sh.run("test -e /root/mark", check=False)[0] == 1
        assert sh.json("particle status --json")["root"]["unlock"] == [
            "tpm2 (PCR 7)", "recovery key"]
        machine.recovery_key = key
        sh.run(f"echo {MARK} > /root/mark && sync")
        sh.start("poweroff")
        vm.wait(300)
    assert re.search(PASSPHRASE_PROMPT, vm.text()) is None


def test_empty_tpm_needs_the_recovery_key(machine: Machine) -> None:
    assert machine.recovery_key is not None
    start = time.monotonic()
    with machine.boot(machine.tmp / "other-tpm", "3") as vm:
        vm.expect(PASSPHRASE_PROMPT, 600)
        assert "automatic login" not in vm.text()
        vm.send(machine.recovery_key + "\r")
        sh = GuestShell(vm)
        sh.login(600)
        machine.boot_seconds["boot with the recovery key"] = time.monotonic() - start
        assert sh.out("cat /root/mark") == MARK
        sh.start("poweroff")
        vm.wait(300)
