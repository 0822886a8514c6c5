"""`particle update` and `particle rollback` on the running machine.

update: systemd-sysupdate downloads the new version into the free slot (usr hash tree, usr,
then the UKI, which makes it bootable); the new UKI starts with `[update] tries` boot tries.
rollback: the version the boot loader would start next is marked bad (its UKI renamed to
`+0-N`, as if it had used up its tries), so the previous good version boots again. No EFI
variable is pinned, so the next update still becomes the default as usual.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from ..formats import (
    INCOMING_DIR,
    LOCAL_SYSUPDATE_DIR,
    MANIFEST_SUFFIX,
    Manifest,
    artifact_stem,
    chunk_index_name,
    is_oci,
)
from . import bootlog, changes, delta, gpt, registry, status, switch, sysext
from . import entries as boot_entries
from .cli import MachineError
from .entries import Entry
from .files import clear_dir, remove_tree
from .versions import vercmp, version_key

SYSUPDATE = "/usr/lib/systemd/systemd-sysupdate"
LOCK = Path("/run/particle-update.lock")
# Written by the builder: the image's transfers with a local source directory, for files
# particle fetched and verified itself.
LOCAL_DEFINITIONS = Path("/") / LOCAL_SYSUPDATE_DIR
INCOMING = Path(INCOMING_DIR)


def _sysupdate(*args: str, capture: bool = False) -> subprocess.CompletedProcess[str]:
    if not os.path.exists(SYSUPDATE):
        raise MachineError(f"{SYSUPDATE} is missing (package systemd-container)")
    env = dict(os.environ, SYSTEMD_COLORS="0", SYSTEMD_PAGER="")
    return subprocess.run([SYSUPDATE, "--no-pager", *args], env=env, text=True, check=False,
                          stdout=subprocess.PIPE if capture else None,
                          stderr=subprocess.PIPE if capture else None)


def _require_definitions() -> str:
    """The image's update source (read once per command: every step uses this one)."""
    source = status.update_source()
    if source is None:
        raise MachineError("this image has no update definitions (build it with "
                           "[update] source set)")
    return source


def _running_version() -> str:
    return boot_entries.running_image()[1]


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


def check(running: str, source: str) -> dict[str, Any]:
    """What a newer version would be: asks sysupdate (or the registry's tags) for every version
    it knows and the boot entries for what is already installed; for a version to install,
    what it costs (delta and full download) and its package changes."""
    if is_oci(source):
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
    result: dict[str, Any] = {"running": running, "newest": newest}
    if vercmp(newest, running) <= 0:
        return result | {"state": "up-to-date",
                         "message": f"up to date: {running} is the newest version"}
    _, found = _entries()
    installed = next((e for e in found if e.version == newest), None)
    if installed is None:
        result |= {"state": "available",
                   "message": f"update available: {newest} (running {running})"}
        result |= _preview(running, newest, source)
        return result
    if installed.state == "bad":
        return result | {"state": "bad", "message": f"up to date: {running}; {newest} is "
                         "installed but failed its boot assessment"}
    return result | {"state": "installed",
                     "message": f"{newest} is installed and boots next (running {running})"}


def _preview(running: str, newest: str, update_source: str) -> dict[str, Any]:
    """Download sizes and package changes of an update to `newest` (what can be known: a
    source without a store or manifests gives less, never an error)."""
    if is_oci(update_source):
        return {}  # registries: the version and nothing more, for now
    source, image_id, verify, _ = _delta_setup(update_source)
    work = Path("/run/particle-check")
    out: dict[str, Any] = {}
    remove_tree(work)
    work.mkdir(mode=0o700, parents=True)
    try:
        sums = delta.read_published(source, work, verify)
        files = delta.version_files(sums, image_id).get(newest)
        if files:
            o = delta.Offer(newest, files, sums)
            p = delta.preview(o, source, _held(image_id), work)
            out["download"] = {"delta_bytes": p.delta, "full_bytes": p.full, "seeds": p.seeds,
                               "store": p.delta != p.full or bool(p.seeds)}
        new = _manifest(image_id, newest, sums, source, work)
        old = _manifest(image_id, running, sums, source, work) or _running_manifest(image_id,
                                                                                 running)
        if new is not None and old is not None:
            out["changes"] = changes.compare(old, new).to_json()
    except delta.DeltaError as err:
        out["note"] = f"no details: {err}"
    finally:
        remove_tree(work)
    return out


def _manifest(image_id: str, version: str, sums: dict[str, str], source: delta.Source,
              work: Path) -> Manifest | None:
    """A version's build manifest: kept on this machine, else published (digest-checked)."""
    name = artifact_stem(image_id, version) + MANIFEST_SUFFIX
    try:
        return Manifest.from_json((delta.KEPT / name).read_text())
    except (OSError, ValueError):
        pass
    if name not in sums:
        return None
    try:
        return Manifest.from_json(delta.fetch_verified(source, name, sums[name], work).decode())
    except (delta.DeltaError, ValueError):
        return None


def _running_manifest(image_id: str, running: str) -> Manifest | None:
    """The running version's packages from its factory dpkg status (in /usr, so its own)."""
    try:
        text = delta.FACTORY_DPKG_STATUS.read_text()
    except OSError:
        return None
    return Manifest(id=image_id, version=running, release="", architecture="",
                    kernel=os.uname().release, usr_filesystem="", root_hash="",
                    packages=delta.packages_from_dpkg_status(text))


def render_check(result: dict[str, Any]) -> str:
    lines = [str(result["message"])]
    dl = result.get("download")
    if dl:
        if dl["store"]:
            lines.append(f"download: {delta.mib(dl['delta_bytes'])} as a delta (full download "
                         f"{delta.mib(dl['full_bytes'])}; from {', '.join(dl['seeds']) or 'none'})")
        else:
            lines.append(f"download: {delta.mib(dl['full_bytes'])} (no chunk store at the "
                         "source: full download)")
    ch = result.get("changes")
    if ch:
        c = changes.Changes(ch["old"], ch["new"], ch["added"], ch["removed"],
                            {k: (v[0], v[1]) for k, v in ch["upgraded"].items()},
                            {k: (v[0], v[1]) for k, v in ch["downgraded"].items()},
                            tuple(ch["kernel"]) if ch["kernel"] else None)
        lines += c.render(download=False).splitlines()
    if result.get("note"):
        lines.append(str(result["note"]))
    return "\n".join(lines)


def _delta_setup(source: str) -> tuple[delta.Source, str, bool, bool]:
    """(source, image id, verify the index, signed /usr) from the image's transfer files."""
    image_id = boot_entries.running_image()[0]
    verify = signed = False
    for d in status.SYSUPDATE_DIRS:
        for f in sorted(d.glob("*.transfer")) if d.is_dir() else []:
            signed = signed or "usr-verity-sig" in f.name
            verify = verify or any(line.strip() == "Verify=yes"
                                   for line in f.read_text().splitlines())
    return delta.Source(source), image_id, verify, signed


def _held(image_id: str) -> list[delta.Held]:
    """The files of versions this machine holds: the usr slots (running one first, read raw up
    to the image's size) and the UKIs on the ESP."""
    disk = _disk()
    under = {n for _, n in gpt.partitions_under(gpt.block_of("/usr"))}
    slots = status.slots_from_gpt(gpt.read_disk_gpt(disk), image_id)
    slots.sort(key=lambda s: s.usr.number not in under)
    held = [delta.Held(f"{image_id}_{s.version}_{s.usr.uuid}.usr.raw",
                       gpt.partition_device(disk, s.usr.number), f"slot {s.name} ({s.version})")
            for s in slots if s.version]
    # The hash trees too: leaf hashes of /usr blocks that did not change stay the same.
    held += [delta.Held(f"{image_id}_{s.version}_{s.verity.uuid}.usr-verity.raw",
                        gpt.partition_device(disk, s.verity.number),
                        f"hash tree {s.name} ({s.version})")
             for s in slots if s.version and s.verity is not None]
    _, found = _entries()
    held += [delta.Held(f"{image_id}_{e.version}.efi", str(e.path), f"UKI {e.version}")
             for e in found]
    return held


def _extension_transfers() -> bool:
    """Whether installed extensions have transfers of their own: sysupdate's full download
    runs them with the base's; the local install of a delta does not."""
    d = sysext.TRANSFER_DIR
    return d.is_dir() and any(p.name.startswith(sysext.TRANSFER_PREFIX)
                              for p in d.glob("*.transfer"))


def install_by_delta(running: str, update_source: str) -> bool:
    """Install the newest version from chunks this machine has plus those the source's store
    holds. False when sysupdate's own download has to do it: nothing newer, no store, or the
    delta failed (said in one line; nothing of it is installed)."""
    source, image_id, verify, signed = _delta_setup(update_source)
    delta.clean_incoming()
    work = delta.INCOMING / ".work"
    work.mkdir(parents=True, exist_ok=True)
    try:
        o = delta.offer(source, image_id, running, verify=verify, signed=signed, work=work)
        _, found = _entries()
        if o is None or any(e.version == o.version for e in found):
            return False
        if _extension_transfers():
            print("extensions installed: downloading the whole version (delta updates do not "
                  "cover extensions yet)", flush=True)
            return False
        if not any(chunk_index_name(n) in o.sums for n in o.files.values()):
            print(f"no chunk store at {source.base} for {o.version}: downloading it whole",
                  flush=True)
            return False
        started = time.monotonic()
        staged = delta.stage(o, source, _held(image_id), lambda m: print(m, flush=True))
    except delta.DeltaError as err:
        print(f"delta update not possible: {err}; falling back to the full download",
              flush=True)
        delta.clean_incoming()
        return False
    share = 100 * staged.fetched / staged.full if staged.full else 0
    print(f"rebuilt {staged.version} from chunks: downloaded {delta.mib(staged.fetched)} of "
          f"{delta.mib(staged.full)} ({share:.1f} %) in {time.monotonic() - started:.0f} s; "
          "installing", flush=True)
    try:
        install_local()
    except MachineError as err:
        print(f"installing the rebuilt files failed ({err}); falling back to the full "
              "download", flush=True)
        return False
    finally:
        delta.clean_incoming()
    for name, data in staged.keep.items():
        with contextlib.suppress(OSError):
            delta.keep_file(name, data)
    _, after = _entries()
    here = {e.version for e in after} | {
        s.version for s in status.slots_from_gpt(gpt.read_disk_gpt(_disk()), image_id)
        if s.version}
    delta.prune_kept(here, image_id)
    return True


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
    source = _require_definitions()
    running = _running_version()
    if args.check:
        result = check(running, source)
        if args.json or args.update_json:
            print(json.dumps(result, indent=2))
        else:
            print(render_check(result))
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
        print(f"running {running}; looking for updates at {source}", flush=True)
        if is_oci(source):  # particle fetches and verifies, then
            if registry.fetch(running, {e.version for e in before}, INCOMING):  # sysupdate
                install_local()
        elif not install_by_delta(running, source):
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
        clear_dir(INCOMING)


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
    image_id = boot_entries.running_image()[0]
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
    p.add_argument("--check", action="store_true",
                   help="only say whether a newer version exists, what it downloads (delta "
                        "and full) and which packages change")
    p.add_argument("--json", dest="update_json", action="store_true",
                   help="with --check: machine-readable output")
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
