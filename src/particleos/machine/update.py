"""`particle update` and `particle rollback` on the running machine.

update: systemd-sysupdate downloads the new version into the free slot (usr hash tree, usr,
then the UKI, which makes it bootable); the new UKI starts with `[update] tries` boot tries.
rollback: the version the boot loader would start next is marked bad (its UKI renamed to
`+0-N`, as if it had used up its tries), so the previous good version boots again. No EFI
variable is pinned, so the next update still becomes the default as usual.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import subprocess
from pathlib import Path

from . import bootlog, gpt, registry, status, switch
from . import entries as boot_entries
from .cli import MachineError
from .entries import Entry
from .versions import vercmp, version_key

SYSUPDATE = "/usr/lib/systemd/systemd-sysupdate"
LOCK = Path("/run/particle-update.lock")
# Written by the builder (update.transfer.LOCAL_SYSUPDATE_DIR / INCOMING_DIR): the image's
# transfers with a local source directory, for files particle fetched and verified itself.
LOCAL_DEFINITIONS = Path("/usr/lib/particle/sysupdate.local.d")
INCOMING = Path("/var/lib/particle/incoming")


def _sysupdate(*args: str, capture: bool = False) -> subprocess.CompletedProcess[str]:
    if not os.path.exists(SYSUPDATE):
        raise MachineError(f"{SYSUPDATE} is missing (package systemd-container)")
    env = dict(os.environ, SYSTEMD_COLORS="0", SYSTEMD_PAGER="")
    return subprocess.run([SYSUPDATE, "--no-pager", *args], env=env, text=True, check=False,
                          stdout=subprocess.PIPE if capture else None,
                          stderr=subprocess.PIPE if capture else None)


def _require_definitions() -> None:
    if status.update_source() is None:
        raise MachineError("this image has no update definitions (build it with "
                           "[update] source set)")


def _running_version() -> str:
    return boot_entries.os_release_fields(status.OS_RELEASE.read_text()).get("IMAGE_VERSION", "?")


def _entries() -> tuple[Path, list[Entry]]:
    esp = boot_entries.find_esp()
    found = boot_entries.list_entries(esp)
    boot_entries.apply_bootctl(found)
    return esp, found


def clean_stale_downloads(esp: Path) -> list[Path]:
    """Remove UKI downloads that an interrupted sysupdate left on the ESP (`.#sysupdate*`):
    each is as large as a UKI and a few of them would fill the ESP."""
    removed = []
    linux = esp / "EFI/Linux"
    for p in sorted(linux.glob(".#sysupdate*")) if linux.is_dir() else []:
        p.unlink()
        removed.append(p)
    return removed


def _automatic_update_running() -> bool:
    proc = subprocess.run(["systemctl", "is-active", "--quiet", "systemd-sysupdate.service"],
                          check=False)
    return proc.returncode == 0


def check(running: str) -> str:
    """What a newer version would be: asks sysupdate (or the registry's tags) for every version
    it knows and the boot entries for what is already installed."""
    if registry.is_oci(status.update_source()):
        newest = registry.newest_version(running) or running
    else:
        proc = _sysupdate("--json=short", "list", capture=True)
        try:
            listed = json.loads(proc.stdout) if proc.returncode == 0 else None
        except ValueError:
            listed = None
        if not isinstance(listed, dict):
            raise MachineError(f"checking for updates failed:\n{proc.stderr.strip()}")
        versions = sorted((str(v) for v in listed.get("all") or []), key=version_key)
        newest = versions[-1] if versions else running
    if vercmp(newest, running) <= 0:
        return f"up to date: {running} is the newest version"
    _, found = _entries()
    installed = next((e for e in found if e.version == newest), None)
    if installed is None:
        return f"update available: {newest} (running {running})"
    if installed.state == "bad":
        return f"up to date: {running}; {newest} is installed but failed its boot assessment"
    return f"{newest} is installed and boots next (running {running})"


def running_unproven(found: list[Entry], running: str) -> str | None:
    """Why updating now would be unsafe, or None. An update overwrites the slot of the other
    version; while the running one has not been marked good, that other version is the only
    one known to boot."""
    mine = next((e for e in found if e.version == running), None)
    if mine is None or mine.state != "pending":
        return None
    fallback = [e.version for e in found if e.state == "good" and e.version != running]
    how = ("was switched to without a firmware boot" if not mine.booted
           else "is still being assessed")
    return (f"{running} {how} and is not marked good yet: an update now would overwrite "
            f"{', '.join(fallback) or 'the other slot'}, the last version known to boot")


def cmd_update(args: argparse.Namespace) -> int:
    _require_definitions()
    running = _running_version()
    if args.check:
        print(check(running))
        return 0
    with open(LOCK, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            raise MachineError("another `particle update` is running") from err
        if _automatic_update_running():
            raise MachineError("systemd-sysupdate.service (the automatic update) is running; "
                               "try again when it is done")
        esp, before = _entries()
        unproven = running_unproven(before, running)
        if unproven is not None and not args.force:
            raise MachineError(unproven + "; reboot (and let it be marked good) first, or "
                               "use --force")
        known = {e.id for e in before}
        for p in clean_stale_downloads(esp):
            print(f"removed an interrupted download: {p}")
        for name in switch.detach_stale_usr():
            print(f"detached the unused /usr device {name}")
        print(f"running {running}; looking for updates at {status.update_source()}", flush=True)
        if registry.is_oci(status.update_source()):  # particle fetches and verifies, then
            if registry.fetch(running, {e.version for e in before}, INCOMING):  # sysupdate
                install_local()
        else:
            install_from_source()
    _, found = _entries()
    default = next((e for e in found if e.default), None)
    if default is None or default.version == running:
        print(f"up to date: {running}")
        return 0
    fresh = default.id not in known
    tries = default.tries_left if default.tries_left is not None else "-"
    print(f"{'installed' if fresh else 'already installed:'} {default.version} "
          f"({default.path.name}, {tries} boot tries left); it boots next", flush=True)
    if args.soft or args.kexec:
        disk = _disk()
        switch.switch(default, disk, force_kexec=args.kexec)
    elif args.reboot:
        switch.announce(f"reboot into {default.version}")
        subprocess.run(["systemctl", "reboot"], check=False)
    else:
        print("reboot to start it, or switch to it now: particle update --soft")
    return 0


def install_from_source() -> None:
    """systemd-sysupdate downloads and installs the newest version from the update source."""
    _finish_install(_sysupdate("update"), "systemd-sysupdate update")


def install_local() -> None:
    """Install the version whose files particle has put into INCOMING and verified (their
    digests against the signed SHA256SUMS): the same transfers as the URL path with a local
    source, so sysupdate's slot handling, UKI last and boot counting are the same. The
    files are removed afterwards, installed or not (they are as large as a version)."""
    if not LOCAL_DEFINITIONS.is_dir():
        raise MachineError(f"{LOCAL_DEFINITIONS} is missing: this image installs only "
                           "through systemd-sysupdate's own download")
    try:
        proc = _sysupdate(f"--definitions={LOCAL_DEFINITIONS}", "update")
        _finish_install(proc, f"systemd-sysupdate update from {INCOMING}")
    finally:
        for f in INCOMING.iterdir() if INCOMING.is_dir() else []:
            if f.is_file():
                f.unlink()


def _finish_install(proc: subprocess.CompletedProcess[str], what: str) -> None:
    if proc.returncode != 0:
        raise MachineError(f"{what} failed (see above); the running version and its boot "
                           "entry are unchanged")
    # sysupdate syncs what it downloads but not the final rename of the UKI: without this,
    # a power loss right after "installed" can silently lose the update (measured).
    os.sync()


def _disk() -> str:
    under = gpt.partitions_under(gpt.block_of("/usr")) or \
        gpt.partitions_under(gpt.block_of("/"))
    if not under:
        raise MachineError("cannot tell which disk /usr is on")
    return under[0][0]


def choose_rollback(found: list[Entry], slot_of: dict[str, bool]) -> tuple[Entry, Entry]:
    """(entry to mark bad, entry that then boots): the current default goes; the first good
    entry after it in boot order whose /usr is on the disk comes back."""
    default = next((e for e in found if e.default), None)
    if default is None:
        raise MachineError("no boot entries found")
    for e in found:
        if e is not default and e.state == "good" and slot_of.get(e.path.name):
            return default, e
    others = ", ".join(f"{e.path.name} ({e.state})" for e in found if e is not default)
    raise MachineError(f"no other good version to roll back to (other entries: "
                       f"{others or 'none'})")


def _entries_on_disk() -> tuple[list[Entry], dict[str, bool]]:
    """The boot entries, and which of them have their /usr on this disk (name -> True)."""
    _, found = _entries()
    image_id = boot_entries.os_release_fields(status.OS_RELEASE.read_text()).get("IMAGE_ID", "")
    st_slots = status.slots_from_gpt(gpt.read_disk_gpt(_disk()), image_id)
    status.link_entries(st_slots, found)
    return found, {name: True for s in st_slots for name in s.entries}


def cmd_rollback(args: argparse.Namespace) -> int:
    found, on_disk = _entries_on_disk()
    bad, back = choose_rollback(found, on_disk)
    for var in ("LoaderEntryOneShot", "LoaderEntryDefault"):
        value = boot_entries.efi_var(var)
        if value and value.lower() == bad.id.lower():
            flag = "set-oneshot" if var.endswith("OneShot") else "set-default"
            subprocess.run(["bootctl", flag, ""], check=False)
    new_path = boot_entries.mark_bad(bad)
    os.sync()  # the ESP is FAT: make the rename survive a power loss
    print(f"marked {bad.version} bad ({bad.path.name} -> {new_path.name}); "
          f"{back.version} boots next")
    if args.reboot:
        switch.announce(f"reboot into {back.version}")
        subprocess.run(["systemctl", "reboot"], check=False)
    return 0


def retry_target(found: list[Entry], version: str, on_disk: dict[str, bool],
                 tries: int) -> tuple[Entry, str]:
    """The bad entry of `version` and its new name with `tries` tries again (`+TRIES-0`)."""
    matches = [e for e in found if e.version == version or
               bootlog.version_of(e.id) == version]
    if not matches:
        known = ", ".join(sorted({e.version for e in found})) or "none"
        raise MachineError(f"no boot entry of version {version} (boot entries: {known})")
    bad = [e for e in matches if e.state == "bad"]
    if not bad:
        raise MachineError(f"{version} is not marked bad ({matches[0].path.name}): nothing to "
                           "retry")
    entry = bad[0]
    if not on_disk.get(entry.path.name):
        raise MachineError(f"the /usr of {version} is no longer on this disk (its slot holds "
                           "another version): install it again instead")
    return entry, boot_entries.counted_name(entry.id, tries, 0)


def transfer_tries(default: int = 3) -> int:
    """TriesLeft= of the UKI transfer: the tries a freshly installed version gets."""
    for d in status.SYSUPDATE_DIRS:
        for f in sorted(d.glob("*.transfer")) if d.is_dir() else []:
            for line in f.read_text().splitlines():
                if line.strip().startswith("TriesLeft="):
                    try:
                        return int(line.split("=", 1)[1])
                    except ValueError:
                        pass
    return default


def cmd_retry(args: argparse.Namespace) -> int:
    found, on_disk = _entries_on_disk()
    entry, new_name = retry_target(found, args.version, on_disk, args.tries or transfer_tries())
    target = entry.path.with_name(new_name)
    if target.exists():
        raise MachineError(f"{target} already exists")
    os.rename(entry.path, target)
    os.sync()  # the ESP is FAT: make the rename survive a power loss
    forgotten = bootlog.forget(entry.id)
    print(f"{args.version} gets {args.tries or transfer_tries()} tries again "
          f"({entry.path.name} -> {new_name}); it boots next"
          + (f"; {forgotten} records of its failed boots cleared" if forgotten else ""))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("update", help="download and install the newest version (sysupdate)")
    p.add_argument("--check", action="store_true", help="only say whether a newer version exists")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--reboot", action="store_true", help="reboot into it when installed")
    how.add_argument("--soft", action="store_true",
                     help="switch to it without firmware reboot (soft-reboot, or kexec when "
                          "the kernel differs)")
    how.add_argument("--kexec", action="store_true",
                     help="like --soft, but always kexec the new UKI's kernel")
    p.add_argument("--force", action="store_true",
                   help="update even though the running version is not marked good yet")
    p.set_defaults(func=cmd_update)
    r = sub.add_parser("rollback", help="make the previous good version the default again")
    r.add_argument("--reboot", action="store_true", help="reboot into it")
    r.set_defaults(func=cmd_rollback)
    t = sub.add_parser("retry", help="give a version marked bad its tries again")
    t.add_argument("version", help="the version (see `particle status`)")
    t.add_argument("--tries", type=int, help="how many (default: TriesLeft= of the update "
                   "transfer)")
    t.set_defaults(func=cmd_retry)
