"""Boot entries: the UKIs in the ESP's /EFI/Linux, their boot counters and which one
systemd-boot boots next.

A file `ID_VERSION+LEFT-DONE.efi` is a version still being tried (LEFT boots left), `+0-DONE`
one that failed all its tries (systemd-boot sorts it last, so the previous version boots),
and a name without a counter a version systemd-bless-boot has marked good (or the image's
first one, which is trusted). Rollback uses the same mechanism: it marks an entry bad.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from .. import formats
from . import pe
from .files import fsync_dir
from .versions import vercmp

OS_RELEASE = Path("/usr/lib/os-release")

LOADER_GUID = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"
EFIVARS = Path("/sys/firmware/efi/efivars")
ESP_CANDIDATES = (Path("/efi"), Path("/boot"), Path("/boot/efi"))
_COUNTER = re.compile(r"^(?P<stem>.+?)(?:\+(?P<left>\d+)(?:-(?P<done>\d+))?)?\.efi$", re.I)


@dataclass
class Entry:
    path: Path
    id: str  # file name without the counter, as systemd-boot and bootctl name the entry
    version: str
    sort_key: str
    tries_left: int | None
    tries_done: int | None
    cmdline: str = ""
    uname: str = ""
    default: bool = False
    booted: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def state(self) -> str:
        """good (no counter), pending (tries left), bad (no tries left)."""
        if self.tries_left is None:
            return "good"
        return "bad" if self.tries_left == 0 else "pending"

    @property
    def usrhash(self) -> str | None:
        m = re.search(r"(?:^|\s)usrhash=([0-9a-fA-F]+)", self.cmdline)
        return m.group(1).lower() if m else None

    @property
    def usr_uuids(self) -> tuple[str, str] | None:
        """(usr, usr-verity) partition UUIDs this entry boots: its usrhash= halves, as the
        builder names the partitions (formats.verity_partition_uuids)."""
        rh = self.usrhash
        if not rh or len(rh) < 64 or len(rh) % 2:
            return None
        return formats.verity_partition_uuids(rh)

    def to_json(self) -> dict[str, object]:
        return {
            "file": self.path.name, "id": self.id, "version": self.version,
            "state": self.state, "tries_left": self.tries_left, "tries_done": self.tries_done,
            "default": self.default, "booted": self.booted, "usrhash": self.usrhash,
            "kernel": self.uname,
        }


def parse_name(name: str) -> tuple[str, int | None, int | None] | None:
    """`ID_V+3-1.efi` -> ("ID_V.efi", 3, 1); `ID_V.efi` -> ("ID_V.efi", None, None)."""
    m = _COUNTER.match(name)
    if not m:
        return None
    left = int(m.group("left")) if m.group("left") is not None else None
    done = int(m.group("done")) if m.group("done") is not None else None
    if left is not None and done is None:
        done = 0
    return f"{m.group('stem')}.efi", left, done


def counted_name(entry_id: str, left: int, done: int) -> str:
    return f"{entry_id.removesuffix('.efi')}+{left}-{done}.efi"


def os_release_fields(text: str) -> dict[str, str]:
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() and not key.startswith("#"):
            fields[key.strip()] = value.strip().strip("\"'")
    return fields


def running_image(os_release: Path | None = None) -> tuple[str, str]:
    """(IMAGE_ID, IMAGE_VERSION) of the running /usr ("" and "?" when os-release lacks them):
    /usr/lib/os-release, so the version is the one of the /usr actually mounted."""
    fields = os_release_fields((os_release or OS_RELEASE).read_text())
    return fields.get("IMAGE_ID", ""), fields.get("IMAGE_VERSION", "?")


def read_entry(path: Path) -> Entry | None:
    parsed = parse_name(path.name)
    if parsed is None:
        return None
    entry_id, left, done = parsed
    try:
        osrel = os_release_fields(pe.read_text(path, ".osrel") or "")
        cmdline = pe.read_text(path, ".cmdline") or ""
        uname = pe.read_text(path, ".uname") or ""
    except (OSError, pe.PEError) as err:
        entry = Entry(path, entry_id, "?", "", left, done)
        entry.notes.append(f"unreadable: {err}")
        return entry
    version = osrel.get("IMAGE_VERSION") or osrel.get("VERSION_ID") or "?"
    sort_key = osrel.get("IMAGE_ID") or osrel.get("ID") or ""
    return Entry(path, entry_id, version, sort_key, left, done, cmdline, uname)


def boot_order(a: Entry, b: Entry) -> int:
    """systemd-boot's order: entries without tries left last, then by sort key, then newest
    version first, then by id, then more tries left and fewer done first."""
    bad_a, bad_b = a.tries_left == 0, b.tries_left == 0
    if bad_a != bad_b:
        return 1 if bad_a else -1
    if a.sort_key != b.sort_key:
        return -1 if a.sort_key < b.sort_key else 1
    r = -vercmp(a.version, b.version) or -vercmp(a.id, b.id)
    if r or a.tries_left is None or b.tries_left is None:
        return r
    if a.tries_left != b.tries_left:
        return -1 if a.tries_left > b.tries_left else 1
    return ((a.tries_done or 0) > (b.tries_done or 0)) - ((a.tries_done or 0) < (b.tries_done or 0))


def efi_var(name: str, efivars: Path = EFIVARS) -> str | None:
    """A systemd-boot string variable (UTF-16), e.g. LoaderEntrySelected."""
    try:
        data = (efivars / f"{name}-{LOADER_GUID}").read_bytes()[4:]
    except OSError:
        return None
    return data.decode("utf-16-le", errors="replace").rstrip("\0") or None


def loader_default(esp: Path) -> str | None:
    try:
        text = (esp / "loader/loader.conf").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.strip().partition(" ")
        if key == "default" and value.strip():
            return value.strip()
    return None


def list_entries(esp: Path, efivars: Path = EFIVARS) -> list[Entry]:
    """Every UKI in ESP/EFI/Linux in boot order, with `default` and `booted` set as
    systemd-boot decides them (one-shot, then default variable, then loader.conf, then the
    first entry)."""
    linux = esp / "EFI/Linux"
    found = []
    if linux.is_dir():
        for path in sorted(linux.iterdir()):
            if path.name.startswith(".") or not path.is_file():
                continue  # .#sysupdate* files are downloads in progress (or interrupted)
            entry = read_entry(path)
            if entry is not None:
                found.append(entry)
    entries = sorted(found, key=functools.cmp_to_key(boot_order))
    chosen = None
    for wanted in (efi_var("LoaderEntryOneShot", efivars), efi_var("LoaderEntryDefault", efivars),
                   loader_default(esp)):
        if wanted:
            chosen = next((e for e in entries if fnmatch.fnmatch(e.id.lower(), wanted.lower())),
                          None)
            if chosen:
                break
    if chosen is None and entries:
        chosen = entries[0]
    if chosen is not None:
        chosen.default = True
    selected = efi_var("LoaderEntrySelected", efivars)
    for e in entries:
        e.booted = selected is not None and e.id.lower() == selected.lower()
    return entries


def find_esp() -> Path:
    """Where the ESP (or XBOOTLDR) is mounted; bootctl knows, the usual places are the fallback."""
    try:
        out = subprocess.run(["bootctl", "--print-boot-path"], capture_output=True, text=True,
                             timeout=30, check=False)
        if out.returncode == 0 and out.stdout.strip():
            return Path(out.stdout.strip())
    except (OSError, subprocess.TimeoutExpired):
        pass
    for candidate in ESP_CANDIDATES:
        if (candidate / "EFI").is_dir():
            return candidate
    raise FileNotFoundError("no ESP found (looked with bootctl and in /efi, /boot, /boot/efi)")


def apply_bootctl(entries: list[Entry]) -> None:
    """Take default/booted from `bootctl list` when it works: it mirrors systemd-boot's own
    rules (our emulation above stays the fallback)."""
    try:
        out = subprocess.run(["bootctl", "list", "--json=short", "--no-pager"],
                             capture_output=True, text=True, timeout=30, check=False)
        listed = json.loads(out.stdout) if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return
    if not isinstance(listed, list):
        return
    by_name = {os.path.basename(str(x.get("path", ""))): x for x in listed if isinstance(x, dict)}
    if not any(e.path.name in by_name for e in entries):
        return
    for e in entries:
        info = by_name.get(e.path.name, {})
        e.default = bool(info.get("isDefault"))
        e.booted = bool(info.get("isSelected"))


def mark_bad(entry: Entry) -> Path:
    """Rename an entry to `+0-DONE`: systemd-boot then sorts it last and never picks it by
    itself, exactly as when it has used up its tries."""
    done = max(entry.tries_done or 0, 1)
    target = entry.path.with_name(counted_name(entry.id, 0, done))
    if target.exists():
        raise FileExistsError(f"{target} already exists")
    os.rename(entry.path, target)
    fsync_dir(target.parent)
    return target
