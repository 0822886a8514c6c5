"""What happened to the boots of a version being tried: the records that particle-trial (in
the initrd and the real root) wrote into the EFI variable ParticleBootLog before each reboot,
turned into one line per failed try for `particle status`.

A record is `BOOT ENTRY UPTIME EVENT DETAIL` (BOOT: the first 8 hex digits of the boot id;
ENTRY: the UKI's file name with the counter that boot had). Events: `start` (initrd), `root`
(the real root runs), `emergency`/`rescue` (DETAIL begins with the stage: usr, root-fs,
initrd, root), `failed` (assessment units), `timeout` (trial_timeout passed), `reboot`. A try
with no failure record ended without a diagnosis: a kernel panic (confirmed when systemd-pstore
kept the kernel's last messages), a hard hang or a power loss.
"""

from __future__ import annotations

import fcntl
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .entries import EFIVARS, parse_name

PARTICLE_GUID = "ead965b3-f7cd-4255-8a2d-8d4e823b83e5"
LOG_NAME = f"ParticleBootLog-{PARTICLE_GUID}"
PSTORE_DIR = Path("/var/lib/systemd/pstore")
FAILURES = ("emergency", "rescue", "failed", "timeout", "reboot")
STAGES = {
    "usr": "/usr could not be set up or mounted (dm-verity, partition or root hash)",
    "root-fs": "the root file system could not be mounted",
    "initrd": "the initrd failed",
    "root": "emergency mode after the switch to the real root",
}


@dataclass
class Record:
    boot: str
    file: str
    uptime: int
    event: str
    detail: str

    @property
    def entry_id(self) -> str:
        parsed = parse_name(self.file)
        return parsed[0] if parsed else self.file

    @property
    def try_number(self) -> int | None:
        parsed = parse_name(self.file)
        return parsed[2] if parsed else None


@dataclass
class Try:
    boot: str
    entry_id: str
    try_number: int | None
    events: list[Record] = field(default_factory=list)
    panic: str | None = None  # "Kernel panic - ..." line kept by systemd-pstore

    @property
    def failure(self) -> Record | None:
        return next((r for r in self.events if r.event in FAILURES), None)

    @property
    def reached_root(self) -> bool:
        return any(r.event == "root" for r in self.events)

    def reason(self) -> tuple[str, str]:
        """(short reason, how it failed, in words)."""
        f = self.failure
        if f is not None:
            if f.event in ("emergency", "rescue"):
                stage, _, units = f.detail.partition(":")
                if re.search(r"(?:^|\s)(?:sys(?:usr|root)-usr\.mount|systemd-veritysetup@usr)",
                             units):
                    stage = "usr"
                words = STAGES.get(stage, f"{f.event} mode")
                units = units.strip()
                return (f"{stage}-setup" if stage in ("usr", "root-fs") else f.event,
                        f"{words}; {f.event} mode, rebooted" + (f" (failed: {units})"
                                                                if units and "no failed" not in
                                                                units else ""))
            if f.event == "failed":
                return "assessment", f"boot assessment failed: {f.detail.strip()}"
            if f.event == "timeout":
                return "timeout", f"hung: {f.detail}"
            return "reboot", "rebooted before the boot was marked good"
        if self.panic:
            return "panic", f"kernel panic: {self.panic}"
        where = "after the switch to the real root" if self.reached_root else "in the initrd"
        return "crash", (f"ended {where} without a record: a kernel panic, a hard hang or a "
                         "power loss")

    def to_json(self) -> dict[str, Any]:
        reason, how = self.reason()
        return {"entry": self.entry_id, "version": version_of(self.entry_id),
                "try": self.try_number, "boot": self.boot, "reason": reason, "how": how,
                "records": [f"{r.event} {r.detail}" for r in self.events]}


def version_of(entry_id: str) -> str:
    stem = entry_id.removesuffix(".efi")
    return stem.split("_", 1)[1] if "_" in stem else stem


def parse_log(data: bytes) -> list[Record]:
    """The variable's content: 4 bytes of attributes, then text lines."""
    records = []
    for raw in data[4:].split(b"\n"):
        if raw[1:4] == b"\0\0\0":
            raw = raw[4:]  # the attributes of an appending write, as a plain file keeps them
        line = raw.decode("utf-8", errors="replace").strip()
        parts = line.split(" ", 4)
        if len(parts) < 4 or not parts[2].isdigit():
            continue
        records.append(Record(parts[0], parts[1], int(parts[2]), parts[3],
                              parts[4] if len(parts) > 4 else ""))
    return records


def group_tries(records: list[Record]) -> list[Try]:
    tries: dict[tuple[str, str], Try] = {}
    for r in records:
        key = (r.boot, r.entry_id)
        if key not in tries:
            tries[key] = Try(r.boot, r.entry_id, r.try_number)
        tries[key].events.append(r)
    return list(tries.values())


def read_log(efivars: Path = EFIVARS) -> list[Record]:
    try:
        return parse_log((efivars / LOG_NAME).read_bytes())
    except OSError:
        return []


def current_boot() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip().split("-")[0]
    except OSError:
        return ""


_PANIC = re.compile(r"Kernel panic - not syncing: ([^\n]*)")


def pstore_panics(pstore: Path = PSTORE_DIR) -> dict[str, str]:
    """boot -> panic message, from the kernel logs systemd-pstore archived: the dump of a
    panicked trial boot holds particle-trial's own records (with the boot id)."""
    found: dict[str, str] = {}
    if not pstore.is_dir():
        return found
    for path in sorted(pstore.rglob("*")):
        if not path.is_file() or path.stat().st_size > 4 << 20:
            continue
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        m = _PANIC.search(text)
        if not m:
            continue
        for boot in re.findall(r"particle-trial: ([0-9a-f]{8}) ", text):
            found[boot] = m.group(1).strip()
    return found


def failed_tries(entry_states: dict[str, str], efivars: Path = EFIVARS,
                 pstore: Path = PSTORE_DIR) -> list[Try]:
    """The failed tries of entries that are still being tried or bad (a blessed or removed
    entry's history no longer matters), oldest first; the running boot is left out."""
    this_boot = current_boot()
    panics = pstore_panics(pstore)
    result = []
    for t in group_tries(read_log(efivars)):
        if t.boot == this_boot or entry_states.get(t.entry_id.lower()) not in ("pending", "bad"):
            continue
        t.panic = panics.get(t.boot)
        result.append(t)
    return result


FS_IOC_GETFLAGS, FS_IOC_SETFLAGS, FS_IMMUTABLE_FL = 0x80086601, 0x40086602, 0x10


def make_mutable(path: Path) -> None:
    """efivarfs marks variables it does not know immutable at each boot (chattr -i)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        flags = struct.unpack("l", fcntl.ioctl(fd, FS_IOC_GETFLAGS, struct.pack("l", 0)))[0]
        if flags & FS_IMMUTABLE_FL:
            fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("l", flags & ~FS_IMMUTABLE_FL))
    except OSError:
        pass
    finally:
        os.close(fd)


def forget(entry_id: str, efivars: Path = EFIVARS) -> int:
    """Drop one entry's records from the variable (after `particle retry`); returns how many."""
    path = efivars / LOG_NAME
    try:
        data = path.read_bytes()
    except OSError:
        return 0
    records = parse_log(data)
    keep = [r for r in records if r.entry_id.lower() != entry_id.lower()]
    if len(keep) == len(records):
        return 0
    make_mutable(path)
    os.unlink(path)
    if keep:
        body = "".join(f"{r.boot} {r.file} {r.uptime} {r.event} {r.detail}\n" for r in keep)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.write(fd, b"\x07\x00\x00\x00" + body.encode())
        finally:
            os.close(fd)
    return len(records) - len(keep)
