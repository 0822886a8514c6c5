"""Install to a disk and factory reset, for real: one chain of three boots.

The image is built once and written by the host's `particle install` into a 4 GiB sparse file
(bigger than the 2.8 GiB image). Boot 1 runs that file with a second, blank 4 GiB virtio disk:
root has grown to fill the disk; the owner writes files in /etc and /var; `particle install`
copies the running version onto the second disk; `particle factory-reset --yes --reboot`.
Boot 2 (the reset): the files are gone, a new machine-id, the same version. Boot 3 runs the
second disk alone: the same version, root created at its first boot and filling that disk.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from particleos import formats
from particleos.builder import BuildResult
from particleos.machine.reset import VARIABLE
from particleos.vm import VM, VMOptions

from .chain import chain_step
from .conftest import BuildFn
from .guestshell import GuestShell

pytestmark = pytest.mark.slow

VERSION = "3.1.0"
GiB = 1 << 30
DISK_SIZE = 4 * GiB
BOOT_TIMEOUT = 900
SECOND = "particle-second"  # serial of the second disk: /dev/disk/by-id/virtio-particle-second
ETC_FILE = "/etc/particle-life.conf"
VAR_FILE = "/var/lib/particle-life/data"


@dataclass
class Life:
    dir: Path
    build: BuildResult
    disk: Path  # the host-installed disk
    second: Path  # blank, then the machine-installed copy
    vm: VM | None = None
    sh: GuestShell | None = None
    failed: str | None = None
    seen: dict[str, Any] = field(default_factory=dict)

    def boot(self, disk: Path, extra_disk: Path | None = None) -> GuestShell:
        assert self.vm is None
        extra = []
        if extra_disk is not None:
            extra = ["-drive", f"if=none,id=disk1,format=raw,file={extra_disk}",
                     "-device", f"virtio-blk-pci,drive=disk1,serial={SECOND}"]
        opts = VMOptions(extra=extra, vars_file=disk.with_name(disk.name + ".vars"),
                         log=self.dir / "console.log")
        t0 = time.monotonic()
        self.vm = VM(disk, opts).start()
        self.sh = GuestShell(self.vm)
        seen = self.sh.login(BOOT_TIMEOUT)
        self.seen.setdefault("power_on_to_shell_s", []).append(round(seen - t0))
        return self.sh

    def power_off(self) -> None:
        if self.vm is not None:
            self.vm.close()
        self.vm, self.sh = None, None


def particle(*args: str | Path, check: bool = False) -> subprocess.CompletedProcess[str]:
    """The host's `particle` command, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "particleos", *map(str, args)],
                          capture_output=True, text=True, check=check, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def life(build_image: BuildFn, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Life]:
    build = build_image("life", VERSION)
    d = tmp_path_factory.mktemp("life")
    m = Life(d, build, d / "installed.raw", d / "second.raw")
    try:
        yield m
    finally:
        m.power_off()
        print(f"\nlife test figures: {m.seen}")


@pytest.fixture(autouse=True)
def chained(life: Life, request: pytest.FixtureRequest) -> Iterator[None]:
    yield from chain_step(life, request)


def root_fills_disk(sh: GuestShell, disk: str) -> dict[str, int]:
    """Sizes (bytes) of the disk, the root partition's end, and root's file system."""
    dev = sh.out("readlink -f $(findmnt -no SOURCE /)").rsplit("/", 1)[-1]
    sizes = {
        "disk": int(sh.out(f"cat /sys/class/block/{disk}/size")) * 512,
        "root_end": (int(sh.out(f"cat /sys/class/block/{dev}/start"))
                     + int(sh.out(f"cat /sys/class/block/{dev}/size"))) * 512,
        "root_fs": int(sh.out("df -B1 --output=size / | tail -1")),
    }
    assert dev.startswith(disk), (dev, disk)
    # The partition ends where the backup GPT begins (1 MiB of slack for alignment), and the
    # file system has grown with it (ext4 keeps a few percent for itself).
    assert sizes["disk"] - sizes["root_end"] < 2 << 20, sizes
    assert sizes["root_fs"] > 0.9 * (sizes["disk"] - 2.6 * GiB), sizes
    return sizes


def test_host_install_writes_a_bigger_disk(life: Life) -> None:
    m = life
    image = m.build.disk
    t0 = time.monotonic()
    r = particle("install", image, m.disk, "--size", "4G")
    m.seen["host_install_s"] = round(time.monotonic() - t0, 1)
    assert r.returncode == 0, r.stderr
    assert m.disk.stat().st_size == DISK_SIZE
    assert m.disk.stat().st_blocks * 512 < image.stat().st_size  # sparse
    src, dst = formats.read_gpt(image), formats.read_gpt(m.disk)
    assert [(p.type, p.uuid, p.label, p.first_lba, p.last_lba, p.attrs) for p in dst] == \
        [(p.type, p.uuid, p.label, p.first_lba, p.last_lba, p.attrs) for p in src]
    # sfdisk finds both headers valid, the backup one at the end of the 4 GiB.
    verify = subprocess.run(["sfdisk", "--verify", m.disk], capture_output=True, text=True)
    assert verify.returncode == 0 and "No errors detected" in verify.stdout, verify.stdout
    table = subprocess.run(["sfdisk", "--json", m.disk], capture_output=True, text=True,
                           check=True).stdout
    assert f'"lastlba": {DISK_SIZE // 512 - 34}' in table
    # Refusals: a target that holds a partition table, and the image itself.
    again = particle("install", image, m.disk)
    assert again.returncode == 1 and "is not empty" in again.stderr and "--force" in again.stderr
    itself = particle("install", image, image, "--force")
    assert itself.returncode == 1 and "the image being installed" in itself.stderr
    with open(m.second, "wb") as f:
        f.truncate(DISK_SIZE)


def test_first_boot_fills_the_disk(life: Life) -> None:
    m = life
    sh = m.boot(m.disk, m.second)
    assert sh.out("systemctl is-active multi-user.target") == "active"
    assert sh.json("particle status --json")["version"] == VERSION
    m.seen["boot1_root"] = root_fills_disk(sh, "vda")
    sh.run(f"echo mine > {ETC_FILE} && mkdir -p {Path(VAR_FILE).parent} && "
           f"echo data > {VAR_FILE} && sync")
    m.seen["machine_id"] = sh.out("cat /etc/machine-id")


def test_machine_install_copies_the_running_version(life: Life) -> None:
    sh = life.sh
    assert sh is not None
    target = f"/dev/disk/by-id/virtio-{SECOND}"
    assert sh.out(f"readlink -f {target}") == "/dev/vdb"
    # Never the running disk, not without a terminal or --yes.
    rc, out = sh.run("particle install /dev/vda --yes 2>&1", check=False)
    assert rc == 1 and "the disk this system runs from" in out, out
    rc, out = sh.run(f"particle install {target} </dev/null 2>&1", check=False)
    assert rc == 1 and "--yes" in out, out
    t0 = time.monotonic()
    out = sh.out(f"particle install {target} --yes 2>&1", timeout=900)
    life.seen["machine_install_s"] = round(time.monotonic() - t0, 1)
    assert f"installed {VERSION} on {target}" in out, out
    # The copy is now a disk with a partition table: a second install is refused.
    rc, out = sh.run(f"particle install {target} --yes 2>&1", check=False)
    assert rc == 1 and "is not empty" in out, out


def test_factory_reset_returns_to_a_first_boot(life: Life) -> None:
    m = life
    sh = m.sh
    assert sh is not None and m.vm is not None
    rc, out = sh.run("particle factory-reset </dev/null 2>&1", check=False)
    assert rc == 1 and "--yes" in out, out
    sh.start("particle factory-reset --yes --reboot")
    m.vm.expect(r"particle: switching now", 120)
    t0 = time.monotonic()
    m.seen["reset_reboot_to_shell_s"] = round(sh.login(BOOT_TIMEOUT) - t0)
    assert sh.run(f"test -e {ETC_FILE}", check=False)[0] == 1
    assert sh.run(f"test -e {VAR_FILE}", check=False)[0] == 1
    new_id = sh.out("cat /etc/machine-id")
    assert len(new_id) == 32 and new_id != m.seen["machine_id"]
    assert sh.out("systemctl is-active multi-user.target") == "active"
    st = sh.json("particle status --json")
    assert st["version"] == VERSION and st["running_slot"] == "A"
    # repart cleared the request; /etc is the factory's, stamped as a first boot.
    assert sh.run(f"test -e /sys/firmware/efi/efivars/{VARIABLE}", check=False)[0] == 1
    assert sh.out("cat /etc/motd") == "Welcome to particle-minimal (ParticleOS)."
    m.seen["boot2_root"] = root_fills_disk(sh, "vda")
    # Root was checked only after repart had replaced it: a check bound to the old root's
    # /dev/gpt-auto-root is stopped when the link moves, and the stop cancels the mount
    # (emergency mode, seen on CI).
    log = sh.out("journalctl -b -o short-monotonic --no-pager "
                 "-u systemd-repart.service -u systemd-fsck-root.service")
    events = [(float(line[1:line.index("]")]), line) for line in log.splitlines()
              if line.startswith("[")]
    finished = [t for t, line in events if "Finished systemd-repart.service" in line]
    checks = [t for t, line in events if "Starting systemd-fsck-root.service" in line]
    assert finished, log
    assert all(t > finished[0] for t in checks), log
    m.power_off()


def test_installed_copy_boots_alone(life: Life) -> None:
    m = life
    parts = formats.read_gpt(m.second)
    image = formats.read_gpt(m.build.disk)
    assert [p.label for p in parts] == [p.label for p in image if p.type != formats.ROOT]
    assert not any(p.type == formats.ROOT for p in parts)  # repart makes it at the first boot
    verify = subprocess.run(["sfdisk", "--verify", m.second], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout
    sh = m.boot(m.second)
    assert sh.out("systemctl is-active multi-user.target") == "active"
    st = sh.json("particle status --json")
    assert st["version"] == VERSION
    assert sh.run(f"test -e {ETC_FILE}", check=False)[0] == 1
    assert sh.out("cat /etc/machine-id") != m.seen["machine_id"]
    m.seen["boot3_root"] = root_fills_disk(sh, "vda")
    m.power_off()
