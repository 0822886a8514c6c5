"""Switch to an installed version without the firmware and the boot loader.

Same kernel: `systemctl soft-reboot` into /run/nextroot, a bind mount of the root file system
with the new version's /usr mounted from its own dm-verity device (checked against the
usrhash= of its UKI, as the initrd would). The kernel, and so the modules in /usr, must match.
Other kernel: kexec of the kernel, initrd and command line inside the new UKI.

Either way the boot loader did not see this boot: the new UKI keeps its boot counter and is
assessed on the next firmware boot.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

from . import etcmerge, gpt, pe
from .cli import MachineError
from .entries import Entry

NEXTROOT = Path("/run/nextroot")
KEXEC_DIR = Path("/run/particle-kexec")
VERITYSETUP = "/usr/lib/systemd/systemd-veritysetup"
KEXEC_CANDIDATES = ("/usr/sbin/kexec", "/sbin/kexec")
RUNTIME_MASKS = ("systemd-veritysetup@usr.service", "systemd-bless-boot.service")
SYS_BLOCK = Path("/sys/class/block")


def run(argv: list[str], what: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise MachineError(f"{what} failed: {' '.join(argv)}: {' / '.join(detail)}")


def partition_node(disk: str, part_uuid: str) -> str:
    """The device of the partition with this PARTUUID on `disk`, read from the GPT itself
    (udev may not have caught up with a slot that sysupdate has just relabelled)."""
    for p in gpt.read_disk_gpt(disk):
        if p.uuid == part_uuid:
            return gpt.partition_device(disk, p.number)
    raise MachineError(f"no partition with UUID {part_uuid} on /dev/{disk}: is the update "
                       "complete?")


def cmdline_value(cmdline: str, key: str) -> str | None:
    m = re.search(rf"(?:^|\s){re.escape(key)}=(\S+)", cmdline)
    return m.group(1) if m else None


def soft_reboot(entry: Entry, disk: str) -> None:
    """Prepare /run/nextroot with the new /usr and ask systemd to soft-reboot into it."""
    rh, uuids = entry.usrhash, entry.usr_uuids
    if rh is None or uuids is None:
        raise MachineError(f"{entry.path.name} has no usrhash= on its command line")
    data, hashdev = (partition_node(disk, u) for u in uuids)
    fstype = cmdline_value(entry.cmdline, "mount.usrfstype") or "erofs"
    name = f"usr-{entry.version}"
    if not Path(f"/dev/mapper/{name}").exists():
        # Signed images: the kernel takes the new /usr only with the root hash signature that
        # the new UKI carries (dm_verity.require_signatures=1).
        opts = cmdline_value(entry.cmdline, "systemd.verity_usr_options")
        run([VERITYSETUP, "attach", name, data, hashdev, rh, *([opts] if opts else [])],
            "dm-verity setup of the new /usr")
    if os.path.ismount(NEXTROOT):
        run(["umount", "--recursive", str(NEXTROOT)], "clean-up of an old /run/nextroot")
    NEXTROOT.mkdir(parents=True, exist_ok=True)
    try:
        # Non-recursive: the root file system alone, without the running /usr on top.
        run(["mount", "--bind", "/", str(NEXTROOT)], "bind mount of the root file system")
        run(["mount", "-o", "remount,bind,dev,suid", str(NEXTROOT)], "remount of the next root")
        run(["mount", "-t", fstype, "-o", "ro", f"/dev/mapper/{name}", str(NEXTROOT / "usr")],
            "mount of the new /usr")
        osrel = (NEXTROOT / "usr/lib/os-release").read_text()
        if f'IMAGE_VERSION="{entry.version}"' not in osrel and \
                f"IMAGE_VERSION={entry.version}\n" not in osrel:
            raise MachineError(f"the new /usr does not say it is version {entry.version}")
    except BaseException:
        subprocess.run(["umount", "--recursive", str(NEXTROOT)], capture_output=True, check=False)
        raise
    # No initrd runs on a soft-reboot: /etc is merged for the new version here instead.
    try:
        print(f"particle: {etcmerge.boot(NEXTROOT)}", flush=True)
    except (OSError, etcmerge.EtcError) as err:
        print(f"particle: /etc merge failed, /etc left as it was (merged at the next "
              f"firmware boot): {err}", flush=True)
    # The next root sees the firmware boot's kernel command line: the veritysetup generator
    # would wait 90 s for the old usrhash= partitions (which a later update may have
    # overwritten) and systemd-bless-boot would judge the entry the firmware booted, not this
    # version. Masked for this boot only (/run survives a soft-reboot, not a reboot).
    run(["systemctl", "mask", "--runtime", *RUNTIME_MASKS], "masking units for the next root")
    announce(f"soft-reboot into {entry.version}")
    run(["systemctl", "soft-reboot"], "systemctl soft-reboot")


def kexec(entry: Entry) -> None:
    """Load the new UKI's kernel, initrd and command line, then `systemctl kexec`."""
    tool = next((t for t in KEXEC_CANDIDATES if os.path.exists(t)), None)
    if tool is None:
        raise MachineError(
            f"{entry.version} has another kernel ({entry.uname or '?'}, running "
            f"{os.uname().release}): switching kernels without the firmware needs kexec "
            "(add kexec-tools to [packages]); reboot instead: particle update --reboot"
        )
    KEXEC_DIR.mkdir(parents=True, exist_ok=True)
    kernel, initrd = KEXEC_DIR / "linux", KEXEC_DIR / "initrd"
    pe.extract(entry.path, ".linux", kernel)
    pe.extract(entry.path, ".initrd", initrd)
    run([tool, "--load", str(kernel), f"--initrd={initrd}", f"--command-line={entry.cmdline}"],
        "kexec --load")
    announce(f"kexec into {entry.version} (kernel {entry.uname or '?'})")
    run(["systemctl", "kexec"], "systemctl kexec")


def announce(what: str) -> None:
    """A line tests and logs can time the switch from."""
    print(f"particle: switching now: {what} (monotonic {time.monotonic():.3f})", flush=True)


def switch(entry: Entry, disk: str, *, force_kexec: bool = False) -> None:
    same_kernel = bool(entry.uname) and entry.uname == os.uname().release
    if same_kernel and not force_kexec:
        soft_reboot(entry, disk)
    else:
        kexec(entry)


def detach_stale_usr() -> list[str]:
    """Detach dm-verity devices of /usr versions that no longer back /usr (left behind by a
    soft-reboot), so that no mapping points into a slot that an update is about to overwrite."""
    current = gpt.block_of("/usr")
    detached = []
    for dm in sorted(SYS_BLOCK.glob("dm-*")):
        try:
            name = (dm / "dm/name").read_text().strip()
            uuid_text = (dm / "dm/uuid").read_text().strip()
        except OSError:
            continue
        if dm.name == current or not name.startswith("usr") or "VERITY" not in uuid_text:
            continue
        if any((dm / "holders").iterdir()):
            continue
        proc = subprocess.run([VERITYSETUP, "detach", name], capture_output=True, check=False)
        if proc.returncode == 0:
            detached.append(name)
    return detached
