"""`particle factory-reset`: the next boot starts the running version as on its first boot.

The systemd way: the image's root definition (/usr/lib/repart.d/50-root.conf) says
`FactoryReset=yes` (bookworm's images have none: systemd 252 has no repart in the initrd and
does not read the variable, so the command refuses there); this command sets the EFI variable
`FactoryReset` (systemd's vendor GUID) that systemd-repart 257 reads in the initrd. repart then
deletes the root partition, unsets the variable itself, and creates root anew (empty ext4
filling the free space); the initrd's particle-etc fills /etc and /var from the factory copy in
/usr, and systemd makes a new machine-id. The ESP, both /usr slots and the boot counters are not
touched: the installed versions and their update state stay. A power cut at any point still
boots: before repart deleted root the variable is still set and the reset runs again; after,
root is missing and repart creates it.
"""

from __future__ import annotations

import argparse
import os
import struct
import subprocess
from pathlib import Path

from .bootlog import make_mutable
from .cli import MachineError
from .install import InstallError, confirm

EFIVARS = Path("/sys/firmware/efi/efivars")
SYSTEMD_VENDOR = "8cf2644b-4b0b-428f-9387-6d876050dc67"
VARIABLE = f"FactoryReset-{SYSTEMD_VENDOR}"
REPART_DIRS = (Path("/etc/repart.d"), Path("/run/repart.d"), Path("/usr/local/lib/repart.d"),
               Path("/usr/lib/repart.d"))
# non-volatile, boot service and runtime access
ATTRIBUTES = 0x7


def variable_data() -> bytes:
    """efivarfs content: the attributes, then "1" as systemd writes strings (UTF-16LE with its
    terminating NUL; repart parses it as a boolean)."""
    return struct.pack("<I", ATTRIBUTES) + "1\0".encode("utf-16-le")


def definitions_with(setting: str, values: tuple[str, ...],
                     dirs: tuple[Path, ...] | None = None) -> list[Path]:
    """The repart definitions that set `setting` to one of `values` (case-insensitive)."""
    wanted = {f"{setting}={v}".lower() for v in values}
    found = []
    for d in REPART_DIRS if dirs is None else dirs:
        for f in sorted(d.glob("*.conf")) if d.is_dir() else []:
            lines = [ln.strip().replace(" ", "").lower() for ln in f.read_text().splitlines()]
            if wanted.intersection(lines):
                found.append(f)
    return found


def reset_definitions(dirs: tuple[Path, ...] | None = None) -> list[Path]:
    """The repart definitions that mark a partition to be removed on a factory reset."""
    return definitions_with("FactoryReset", ("yes", "true", "1"), dirs)


def requested(efivars: Path | None = None) -> bool:
    try:
        data = ((efivars or EFIVARS) / VARIABLE).read_bytes()[4:]
    except OSError:
        return False
    return data.decode("utf-16-le", errors="replace").rstrip("\0").strip().lower() in (
        "1", "yes", "true", "on")


def request(efivars: Path | None = None) -> None:
    """Set the variable (one write, as efivarfs requires)."""
    path = (efivars or EFIVARS) / VARIABLE
    make_mutable(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, variable_data())
    finally:
        os.close(fd)


def cancel(efivars: Path | None = None) -> bool:
    path = (efivars or EFIVARS) / VARIABLE
    if not path.exists():
        return False
    make_mutable(path)
    path.unlink()
    return True


def cmd_factory_reset(args: argparse.Namespace) -> int:
    if args.cancel:
        print("factory reset cancelled" if cancel() else "no factory reset was requested")
        return 0
    if not reset_definitions():
        raise MachineError("this image has no repart definition with FactoryReset=yes "
                           "(/usr/lib/repart.d): it cannot be reset this way (images of Debian "
                           "bookworm have none: its systemd 252 cannot reset root at boot)")
    if not EFIVARS.is_dir():
        raise MachineError("no EFI variables (not booted with UEFI): boot once with "
                           "systemd.factory_reset=1 on the kernel command line instead")
    try:
        ok = confirm("Factory reset: at the next boot everything on the root partition "
                     "(/etc, /var, /root, /home) is erased and this version starts as on its "
                     "first boot. Continue?", args.yes)
    except InstallError as err:
        raise MachineError(str(err)) from err
    if not ok:
        print("nothing changed")
        return 1
    try:
        request()
    except OSError as err:
        raise MachineError(f"could not set the EFI variable {VARIABLE}: {err}") from err
    os.sync()
    print("factory reset requested: the next boot erases the root partition "
          "(`particle factory-reset --cancel` takes it back)")
    if args.reboot:
        print("particle: switching now (reboot)", flush=True)
        subprocess.run(["systemctl", "reboot"], check=False)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("factory-reset",
                       help="erase this machine's data at the next boot (versions stay)")
    p.add_argument("--reboot", action="store_true", help="reboot at once")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.add_argument("--cancel", action="store_true", help="take back a requested reset")
    p.set_defaults(func=cmd_factory_reset)
