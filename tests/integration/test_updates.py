"""A/B updates for real: one machine (a persistent disk and UEFI variables) is driven through
a chain of updates served from an HTTP server on the host's loopback, which the guest reaches
only through QEMU's restricted user networking and a guestfwd relay.

The tests run in order and build on each other (one boot serves many checks): v1 boots and
updates to v2 in the other slot; v3 fails its boot assessment and the machine falls back to
v2 by itself; v4 goes into the reused slot; rollback brings v2 back; the VM is powered off at
three points of an update to v5 and always comes back on a working version; v6 is switched
to with `--soft`. Every version is built once (the bootstrap cache makes each ~10-20 s).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from particleos import runner
from particleos.builder import BuildResult
from particleos.disk import PartType, read_table
from particleos.formats import ChunkIndex, chunk_index_name, chunk_path
from particleos.update.publish import publish
from particleos.verity import verity_uuids
from particleos.vm import VM, VMOptions

from .chain import chain_step
from .conftest import BuildFn
from .guestshell import GuestShell
from .relay import user_nic
from .updateserver import UpdateServer

pytestmark = pytest.mark.slow

ID = "particle-minimal"
TRIES = 2  # [update] tries of tests/integration/specs/updates
V1, V2, V3, V4, V5, V6 = (f"2.0.{i}" for i in range(1, 7))
BROKEN = {V3}  # built from specs/updates-broken: fails particle-health.service
# /etc across updates: v1 and v2 differ in their factory /etc (specs/updates-etc-v1 and
# specs/updates-etc); the others have neither version's /etc/particle-test files.
SPECS = {V1: "updates-etc-v1", V2: "updates-etc", V3: "updates-broken"}
OWN_MOTD = "the owner's own motd"
V2_MOTD = "Welcome to particle-minimal v2."
BOOT_TIMEOUT = 600


@dataclass
class Machine:
    """The one machine all tests in this module drive, and what they measured."""

    dir: Path
    builds: Callable[[str], BuildResult]
    server: UpdateServer
    update_dir: Path
    disk: Path
    vars: Path
    vm: VM | None = None
    sh: GuestShell | None = None
    failed: str | None = None
    figures: dict[str, Any] = field(default_factory=dict)

    def start(self) -> GuestShell:
        """Power on (a new QEMU process on the same disk and UEFI variables) and log in."""
        assert self.vm is None
        opts = VMOptions(nic=[user_nic(self.server.port)], vars_file=self.vars,
                         log=self.dir / "console.log")
        self.vm = VM(self.disk, opts).start()
        self.sh = GuestShell(self.vm)
        self.sh.login(BOOT_TIMEOUT)
        return self.sh

    def power_on_and_cut(self, pattern: str, after: float) -> None:
        """Power on, and pull the plug `after` seconds after `pattern` shows on the console."""
        assert self.vm is None
        opts = VMOptions(nic=[user_nic(self.server.port)], vars_file=self.vars,
                         log=self.dir / "console.log")
        self.vm = VM(self.disk, opts).start()
        self.vm.expect(pattern, BOOT_TIMEOUT)
        time.sleep(after)
        self.power_off()

    def power_off(self) -> None:
        """Pull the plug: QEMU is killed, whatever the guest was doing."""
        if self.vm is not None:
            self.vm.close()
        self.vm, self.sh = None, None

    def publish(self, version: str) -> int:
        return publish(self.builds(version).output_dir, self.update_dir, keep=3).update_bytes

    def status(self) -> dict[str, Any]:
        assert self.sh is not None
        st: dict[str, Any] = self.sh.json("particle status --json")
        return st

    def switch_with(self, command: str, timeout: float = 300) -> float:
        """Run a `particle` command that ends in a reboot or soft-reboot; returns the seconds
        from its "switching now" line to the new system's shell."""
        assert self.vm is not None and self.sh is not None
        self.sh.start(command)
        self.vm.expect(r"particle: switching now", timeout)
        t0 = time.monotonic()
        seen = self.sh.login(BOOT_TIMEOUT)
        return round(seen - t0, 1)

    def console_since(self, start: int) -> str:
        assert self.vm is not None
        return self.vm.text()[start:]


@pytest.fixture(scope="module")
def machine(build_image: BuildFn, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machine]:
    def builds(version: str) -> BuildResult:
        return build_image(SPECS.get(version, "updates"), version)

    for v in (V1, V2, V3, V4, V5, V6):  # all up front: the VM then never waits for a build
        builds(v)
    d = tmp_path_factory.mktemp("updates")
    disk = d / "disk.raw"
    runner.run(["cp", "--sparse=always", builds(V1).disk, disk], what="copy of the v1 disk")
    update_dir = d / "srv"
    update_dir.mkdir()
    with UpdateServer(update_dir) as server:
        m = Machine(d, builds, server, update_dir, disk, d / "efivars.fd")
        try:
            yield m
        finally:
            m.power_off()
            print(f"\nupdate test figures: {m.figures}")


@pytest.fixture(autouse=True)
def chained(machine: Machine, request: pytest.FixtureRequest) -> Iterator[None]:
    yield from chain_step(machine, request)


def entry(st: dict[str, Any], version: str) -> dict[str, Any]:
    found = [e for e in st["entries"] if e["version"] == version]
    assert len(found) == 1, st["entries"]
    result: dict[str, Any] = found[0]
    return result


def slot(st: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(s for s in st["slots"] if s["slot"] == name)
    return found


def check_slot_matches_build(s: dict[str, Any], build: BuildResult) -> None:
    """A slot holding a version carries its label and the UUIDs that its usrhash= names."""
    usr_uuid, verity_uuid = verity_uuids(bytes.fromhex(build.root_hash))
    assert s["label"] == f"{ID}_{build.version}"
    assert s["usr_uuid"] == str(usr_uuid) and s["verity_uuid"] == str(verity_uuid)


def usr_slaves(sh: GuestShell) -> list[str]:
    return sh.out("ls /sys/class/block/$(basename $(readlink -f "
                  "$(findmnt -no SOURCE /usr)))/slaves").split()


def etc_state(m: Machine) -> dict[str, Any]:
    """/etc as `particle status --json` reports it."""
    found: dict[str, Any] = m.status()["etc"]
    return found


def cat(sh: GuestShell, path: str) -> str | None:
    rc, out = sh.run(f"cat {path}", check=False)
    return out.strip() if rc == 0 else None


def assert_v2_etc(sh: GuestShell) -> None:
    """The /etc the v2 update merged: v2's changes where the owner made none, the owner's
    where v2 made none, the owner's motd with v2's beside it."""
    assert cat(sh, "/etc/particle-test/changes.conf") == "level=2"
    assert cat(sh, "/etc/particle-test/added.conf") == "added in v2"
    assert cat(sh, "/etc/particle-test/goes-away.conf") is None
    assert cat(sh, "/etc/particle-test/local.conf") == "mine"
    assert cat(sh, "/etc/motd") == OWN_MOTD
    assert cat(sh, "/etc/motd.particle-new") == V2_MOTD


def test_v1_boots_and_updates_to_v2_in_the_other_slot(machine: Machine) -> None:
    m = machine
    sh = m.start()
    st = m.status()
    assert st["version"] == V1 and st["running_slot"] == "A"
    assert slot(st, "B")["state"] == "empty" and slot(st, "B")["label"] == "_empty"
    check_slot_matches_build(slot(st, "A"), m.builds(V1))
    assert entry(st, V1)["state"] == "good" and entry(st, V1)["booted"]
    assert st["update_source"] == "http://10.0.2.100/" and st["pending"] is None
    assert sh.out("ls /usr/lib/sysupdate.d").split() == [
        "10-usr-verity.transfer", "20-usr.transfer", "30-uki.transfer"]
    uki_transfer = sh.out("cat /usr/lib/sysupdate.d/30-uki.transfer")
    assert f"TriesLeft={TRIES}" in uki_transfer and "InstancesMax=2" in uki_transfer
    m.publish(V1)
    assert f"up to date: {V1}" in sh.out("particle update --check")
    # The owner edits a factory file that v2 changes too, and adds one of their own.
    assert etc_state(m) == {"derived_from": V1, "conflicts": []}
    assert cat(sh, "/etc/particle-test/changes.conf") == "level=1"
    sh.run(f"echo \"{OWN_MOTD}\" > /etc/motd; echo mine > /etc/particle-test/local.conf; sync")

    m.figures["update_bytes"] = full = m.publish(V2)
    check = sh.out("particle update --check")
    assert f"update available: {V2} (running {V1})" in check
    # The preview names the delta (from v1's slot and UKI), the full size, and the package v2
    # adds (htop, with what it pulls in).
    found = re.search(r"download: ([\d.]+) MiB as a delta \(full download ([\d.]+) MiB; "
                      rf"from slot A \({re.escape(V1)}\), .*UKI {re.escape(V1)}\)", check)
    assert found, check
    assert abs(float(found.group(2)) - full / 2**20) < 0.1
    assert re.search(r"^added \(\d+\):\s*$", check, re.M), check
    assert re.search(r"^ +htop \S+\s*$", check, re.M), check
    preview = sh.json("particle update --check --json")
    assert preview["state"] == "available" and preview["newest"] == V2
    assert preview["download"]["full_bytes"] == full
    assert preview["download"]["seeds"] == [f"slot A ({V1})", f"hash tree A ({V1})",
                                            f"UKI {V1}"]
    assert "htop" in preview["changes"]["added"] and preview["changes"]["removed"] == {}
    assert preview["changes"]["upgraded"] == {}
    m.figures["check_delta_bytes"] = preview["download"]["delta_bytes"]
    assert m.vm is not None
    mark = len(m.vm.text())
    m.server.reset_counts()
    m.figures["full_reboot_s"] = m.switch_with("particle update --reboot")
    log = m.console_since(mark)
    # Rebuilt from v1's slot and UKI plus the missing chunks, then installed by sysupdate from
    # the local copy; the server's own count of bytes sent proves how little travelled.
    assert f"rebuilt {V2} from chunks" in log and "falling back" not in log
    served = m.server.sent
    m.figures["delta_served_bytes"] = sum(served.values())
    m.figures["delta_share"] = round(sum(served.values()) / full, 4)
    assert not any(n.endswith((".usr.raw", ".efi")) for n in served), served
    assert sum(served.values()) <= 0.05 * full, served
    assert f"Successfully installed update '{V2}'" in log
    assert f"{ID}_{V2}+{TRIES}-0.efi" in log  # the new UKI starts with its boot counter

    st = m.status()
    assert st["version"] == V2 and st["running_slot"] == "B"
    assert usr_slaves(sh) == ["vda4", "vda5"]  # slot B's hash and data partitions
    assert sh.out("findmnt -no SOURCE,FSTYPE,OPTIONS /usr").startswith("/dev/mapper/usr erofs ro")
    check_slot_matches_build(slot(st, "B"), m.builds(V2))
    check_slot_matches_build(slot(st, "A"), m.builds(V1))
    new = entry(st, V2)
    assert new["booted"] and new["default"] and new["state"] == "good"  # blessed
    assert new["file"] == f"{ID}_{V2}.efi"
    assert st["boot_assessment"] == {"bless_boot": "good", "boot_complete": "active",
                                     "marked_good": True}
    assert sh.out("grep IMAGE_VERSION /usr/lib/os-release") == f'IMAGE_VERSION="{V2}"'
    assert "particle-minimal" in sh.out("particle status")  # the human-readable form works
    # /etc was merged three ways before anything read it; the conflict is listed.
    assert_v2_etc(sh)
    etc = etc_state(m)
    assert etc["derived_from"] == V2
    assert [(c["path"], c["new_factory_version"], c["since"]) for c in etc["conflicts"]] == [
        ("/etc/motd", "/etc/motd.particle-new", V2)]
    assert "/etc conflict: /etc/motd" in sh.out("particle status")
    diff = sh.out("particle etc diff")
    assert "changed  /etc/motd" in diff and f"+{OWN_MOTD}" in diff
    assert "added    /etc/particle-test/local.conf" in diff
    assert "/etc/particle-test/changes.conf" not in diff  # v2's own change is no local edit
    assert sh.out("ls /var/lib/particle/etc/saved") == V1  # v1's /etc, for a rollback


def test_v3_fails_its_boot_assessment_and_v2_comes_back_by_itself(machine: Machine) -> None:
    m = machine
    assert m.vm is not None
    m.publish(V3)
    mark = len(m.vm.text())
    assert m.sh is not None
    m.sh.start("particle update --reboot")
    for _ in range(TRIES):  # every try of v3 fails particle-health.service, which reboots
        m.vm.expect(rf"PARTICLE-HEALTH version={re.escape(V3)} result=bad", BOOT_TIMEOUT)
    # Then the boot loader skips v3 and boots v2 (already blessed: no assessment this time).
    m.vm.expect(r"Linux version", BOOT_TIMEOUT)
    sh = m.sh
    assert sh is not None
    sh.login(BOOT_TIMEOUT)
    log = m.console_since(mark)
    assert log.count("Linux version") == TRIES + 1  # two tries of v3, then v2: no human help
    st = m.status()
    assert st["version"] == V2 and st["running_slot"] == "B"
    bad = entry(st, V3)
    assert bad["state"] == "bad" and bad["tries_left"] == 0 and bad["tries_done"] == TRIES
    assert bad["file"] == f"{ID}_{V3}+0-{TRIES}.efi" and not bad["default"]
    assert entry(st, V2)["default"] and entry(st, V2)["booted"]
    assert st["pending"] is None
    check_slot_matches_build(slot(st, "A"), m.builds(V3))  # v1's slot, reused once
    assert "bad (no tries left" in sh.out("particle status")
    # v3's first boot merged /etc (v3 has none of v2's /etc/particle-test files); v2 boots
    # with the /etc it had, and the one v3 merged is kept aside.
    assert etc_state(m)["derived_from"] == V2
    assert_v2_etc(sh)
    assert sh.out("ls /var/lib/particle/etc/saved") == V3
    assert cat(sh, f"/var/lib/particle/etc/saved/{V3}/particle-test/changes.conf") is None


def chunks_only_in(m: Machine, version: str) -> list[Path]:
    """Stored chunks of `version`'s usr image that no other published version has."""
    indexes = {p.name: ChunkIndex.read(p) for p in m.update_dir.glob(chunk_index_name("*.usr.raw"))}
    mine = next(i for i in indexes.values() if i.file.startswith(f"{ID}_{version}_"))
    others = set().union(*(i.digests() for i in indexes.values() if i is not mine))
    return [chunk_path(m.update_dir, d) for d in sorted(mine.digests() - others)]


def test_v4_installs_into_the_reused_slot_and_boots(machine: Machine) -> None:
    m = machine
    m.publish(V4)
    # One chunk of the store is corrupt: the delta refuses it and the full download still
    # lands v4 (the chunk is mended afterwards: later versions may share it).
    bad = chunks_only_in(m, V4)[0]
    good = bad.read_bytes()
    bad.write_bytes(good[: len(good) // 2] + bytes(len(good) - len(good) // 2))
    assert m.vm is not None
    mark = len(m.vm.text())
    try:
        m.switch_with("particle update --reboot")
    finally:
        bad.write_bytes(good)
    log = m.console_since(mark)
    assert re.search(rf"delta update not possible: chunk {bad.stem[:12]}\.\.\. from the "
                     r"store is corrupt .*; falling back to the full download", log), log[-3000:]
    assert f"Successfully installed update '{V4}'" in log
    sh = m.sh
    assert sh is not None
    st = m.status()
    assert st["version"] == V4 and st["running_slot"] == "A"  # the third write into slot A
    assert usr_slaves(sh) == ["vda2", "vda3"]
    check_slot_matches_build(slot(st, "A"), m.builds(V4))
    check_slot_matches_build(slot(st, "B"), m.builds(V2))
    assert [e["version"] for e in st["entries"]] == [V4, V2]  # v3 was vacuumed
    # Merged from v2's /etc: v2's files the owner left alone went with v2's factory.
    assert etc_state(m)["derived_from"] == V4
    assert cat(sh, "/etc/particle-test/changes.conf") is None
    assert cat(sh, "/etc/particle-test/local.conf") == "mine"
    assert entry(st, V4)["state"] == "good" and st["boot_assessment"]["marked_good"]
    # systemd#34528: nothing re-creates or re-labels slots behind sysupdate's back.
    assert sh.run("systemctl is-failed --quiet systemd-repart.service", check=False)[0] != 0
    assert sh.out("systemctl --failed --no-legend --plain") == ""
    table = read_table(m.disk)
    assert len(table) == len(read_table(m.builds(V1).disk))
    usr = [p for p in table if p["type"].lower() == str(PartType.USR)]
    assert [p["name"] for p in usr] == [f"{ID}_{V4}", f"{ID}_{V2}"]


def test_rollback_brings_back_the_previous_version(machine: Machine) -> None:
    m = machine
    m.figures["full_reboot_rollback_s"] = m.switch_with("particle rollback --reboot")
    st = m.status()
    assert st["version"] == V2 and st["running_slot"] == "B"
    assert entry(st, V4)["state"] == "bad" and not entry(st, V4)["default"]
    assert entry(st, V2)["default"] and entry(st, V2)["booted"]
    assert st["pending"] is None
    assert m.sh is not None
    rc, out = m.sh.run("particle rollback", check=False)  # v4 is bad: nothing to go back to
    assert rc == 1 and "no other good version" in out
    assert etc_state(m)["derived_from"] == V2  # the /etc v2 last had
    assert_v2_etc(m.sh)


def assert_nothing_else_bootable(st: dict[str, Any]) -> None:
    """Only v2 can boot: v5 has no boot entry yet, anything else left over is marked bad."""
    assert V5 not in [e["version"] for e in st["entries"]]
    assert all(e["state"] == "bad" for e in st["entries"] if e["version"] != V2)


def _labels(m: Machine) -> list[str]:
    return [p["name"] for p in read_table(m.disk) if p["type"].lower() == str(PartType.USR)]


def test_power_loss_during_an_update_never_leaves_an_unbootable_machine(
    machine: Machine,
) -> None:
    m = machine
    m.publish(V5)
    uki_size = m.builds(V5).artifacts[f"{ID}_{V5}.efi"].stat().st_size
    # 1. While the new version is rebuilt from chunks: the server stops in the middle of the
    # first chunk the guest fetches (earlier parts may be complete in the incoming directory).
    hold = m.server.hold(".zz", 1)
    assert m.sh is not None
    m.sh.start("particle update")
    assert hold.reached.wait(600), "the guest never fetched a chunk"
    time.sleep(1)
    m.power_off()
    m.server.release_all()
    assert f"{ID}_{V5}" not in _labels(m)  # nothing was written into a slot
    m.start()
    st = m.status()
    assert st["version"] == V2 and entry(st, V2)["booted"] and entry(st, V2)["default"]
    assert_nothing_else_bootable(st)
    # 2. The store is gone, so the update falls back to sysupdate's full download (and cleans
    # up what cut 1 left); after the partitions, before the UKI, the server stops in the
    # middle of the UKI.
    store = m.update_dir / "chunks"
    store.rename(store.with_name("chunks.hidden"))
    hold = m.server.hold(".efi", uki_size // 2)
    assert m.sh is not None and m.vm is not None
    mark = len(m.vm.text())
    m.sh.start("particle update")
    try:
        assert hold.reached.wait(600), "the guest never started to download the UKI"
        fallback = m.console_since(mark)
    finally:
        store.with_name("chunks.hidden").rename(store)
    assert "falling back to the full download" in fallback, fallback[-2000:]
    time.sleep(1)
    m.power_off()
    m.server.release_all()
    m.start()
    sh = m.sh
    assert sh is not None
    st = m.status()
    assert st["version"] == V2 and entry(st, V2)["booted"] and entry(st, V2)["default"]
    assert_nothing_else_bootable(st)
    # An interrupted UKI download may have left a .#sysupdate* file; the next update removes it.
    interrupted = ".#sysupdate" in sh.out("ls -a /boot/EFI/Linux")
    m.figures["partial_uki_left_on_esp"] = interrupted
    # 3. Right after the UKI is in place and `particle update` has said so: the update must
    # survive (sysupdate alone does not sync the UKI's final rename; particle does).
    assert m.vm is not None
    mark = len(m.vm.text())
    sh.start("particle update")
    m.vm.expect(rf"installed {re.escape(V5)} \({re.escape(ID)}_{re.escape(V5)}\+{TRIES}-0\.efi",
                300)
    log = m.console_since(mark)
    m.power_off()
    assert ("removed an interrupted download" in log) == interrupted
    assert f"rebuilt {V5} from chunks" in log
    # 4. During the /etc merge at v5's first boot, in the initrd (a few seconds after the
    # merge unit starts; where exactly it lands is noted): the next boot has a whole /etc.
    m.power_on_and_cut(r"Starting \S*particle-etc\.service", after=3)
    sh = m.start()
    assert m.vm is not None
    done = re.findall(r"particle: (merged /etc|restored the /etc|/etc belongs)", m.vm.text())
    m.figures["etc_merge_after_power_cut"] = done[-1] if done else None
    etc = etc_state(m)
    assert etc["derived_from"] == V5
    assert cat(sh, "/etc/particle-test/local.conf") == "mine"  # the owner's, as merged
    assert cat(sh, "/etc/particle-test/changes.conf") is None  # v5 dropped it (from v2)
    assert cat(sh, "/etc/motd") == OWN_MOTD
    assert [c["path"] for c in etc["conflicts"]] == ["/etc/motd"]
    assert sh.out("ls -a / | grep -c particle-new || true") == "0"
    assert sh.out("ls /var/lib/particle/etc/saved") == V2
    st = m.status()
    assert st["version"] == V5 and st["running_slot"] == "A"
    assert entry(st, V5)["booted"] and entry(st, V5)["state"] == "good"  # counted, blessed
    assert st["boot_assessment"]["marked_good"]
    check_slot_matches_build(slot(st, "A"), m.builds(V5))
    assert ".#sysupdate" not in sh.out("ls -a /boot/EFI/Linux")


def test_soft_update_switches_without_firmware_reboot(machine: Machine) -> None:
    m = machine
    assert m.vm is not None and m.sh is not None
    before = m.status()
    uptime = float(m.sh.out("cut -d' ' -f1 /proc/uptime"))
    m.publish(V6)
    mark = len(m.vm.text())
    m.figures["soft_switch_s"] = m.switch_with("particle update --soft")
    log = m.console_since(mark)
    assert "Linux version" not in log  # no firmware, boot loader or kernel start
    assert "soft-reboot into" in log
    sh = m.sh
    st = m.status()
    assert st["version"] == V6
    assert st["running_slot"] != before["running_slot"]
    assert float(sh.out("cut -d' ' -f1 /proc/uptime")) > uptime  # the same kernel run
    check_slot_matches_build(slot(st, st["running_slot"]), m.builds(V6))
    assert sh.out("findmnt -no FSTYPE,OPTIONS /usr").startswith("erofs ro")
    assert sh.out("systemctl is-system-running") in ("running", "degraded")
    new = entry(st, V6)
    assert new["default"] and new["state"] == "pending"  # assessed at the next firmware boot
    assert entry(st, V5)["booted"]  # what the firmware started, before the switch
    assert st["etc"]["derived_from"] == V6  # merged before the soft-reboot (no initrd ran)
    assert any("without a firmware reboot" in n for n in st["notes"])
    # Until a firmware boot has proven v6, v5 is the only version known to boot: another
    # update would overwrite it, so particle refuses.
    rc, out = sh.run("particle update", check=False)
    assert rc == 1 and "not marked good yet" in out
