"""`particle status`: which version runs and from which slot, what the A/B slots hold, the
boot entries with their boot counters, whether an update waits for a reboot, and whether
this boot has been marked good.

The running version is what /usr says (its os-release), and the running slot is the one
under the /usr device: after `particle update --soft` they differ from what the firmware
booted, which is why neither comes from the kernel command line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import bootlog, encryption, etcmerge, gpt, loader, registry
from . import entries as boot_entries
from .cli import MachineError
from .entries import OS_RELEASE as OS_RELEASE
from .entries import Entry, running_image

SYSUPDATE_DIRS = (Path("/etc/sysupdate.d"), Path("/run/sysupdate.d"), Path("/usr/lib/sysupdate.d"))
BLESS_BOOT = "/usr/lib/systemd/systemd-bless-boot"


@dataclass
class Slot:
    name: str  # A, B, ... in partition table order
    usr: gpt.Partition
    verity: gpt.Partition | None
    version: str | None = None  # from the label; None when empty or foreign
    running: bool = False
    entries: list[str] = field(default_factory=list)  # boot entries whose usrhash= is this slot

    @property
    def state(self) -> str:
        if self.running:
            return "running"
        if self.usr.label == gpt.EMPTY_LABEL:
            return "empty"
        if self.version is None:
            return "foreign"
        return "installed" if self.entries else "no boot entry"

    def to_json(self) -> dict[str, Any]:
        return {
            "slot": self.name, "label": self.usr.label, "version": self.version,
            "state": self.state, "usr_partition": self.usr.number,
            "usr_uuid": self.usr.uuid,
            "verity_partition": self.verity.number if self.verity else None,
            "verity_uuid": self.verity.uuid if self.verity else None,
            "entries": self.entries,
        }


def slots_from_gpt(parts: list[gpt.Partition], image_id: str) -> list[Slot]:
    """usr partitions in table order are the slots; the n-th verity partition belongs to the
    n-th usr partition (the layout puts each slot's pair together)."""
    usr = [p for p in parts if p.type == gpt.USR]
    verity = [p for p in parts if p.type == gpt.USR_VERITY]
    slots = []
    for i, part in enumerate(usr):
        version = None
        if part.label.startswith(f"{image_id}_"):
            version = part.label[len(image_id) + 1 :]
        slots.append(Slot(chr(ord("A") + i), part, verity[i] if i < len(verity) else None,
                          version))
    return slots


def link_entries(slots: list[Slot], entries: list[Entry]) -> None:
    """An entry belongs to the slot whose partition UUIDs are the halves of its usrhash=."""
    for entry in entries:
        u = entry.usr_uuids
        slot = next((s for s in slots if u and s.usr.uuid.lower() == u[0]
                     and (s.verity is None or s.verity.uuid.lower() == u[1])), None)
        if slot is not None:
            slot.entries.append(entry.path.name)
        elif entry.state != "bad":
            entry.notes.append("its /usr is not on this disk")


def entry_slot(slots: list[Slot], entry: Entry) -> Slot | None:
    return next((s for s in slots if entry.path.name in s.entries), None)


def run_text(argv: list[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return proc.stdout.strip()


def update_source() -> str | None:
    """The registry the builder recorded (`particle update` fetches from it itself), else the
    Path= of the first transfer's [Source] (they all use the same source)."""
    try:
        return registry.SOURCE_FILE.read_text().strip() or None
    except FileNotFoundError:
        pass
    for d in SYSUPDATE_DIRS:
        for f in sorted(d.glob("*.transfer")) if d.is_dir() else []:
            section = ""
            for line in f.read_text().splitlines():
                line = line.strip()
                if line.startswith("["):
                    section = line
                elif section == "[Source]" and line.startswith("Path="):
                    return line[5:]
    return None


def collect() -> dict[str, Any]:
    """Everything `particle status` shows, gathered from the running machine."""
    image_id, version = running_image()
    notes: list[str] = []
    under = gpt.partitions_under(gpt.block_of("/usr"))
    disk = under[0][0] if under else gpt.partitions_under(gpt.block_of("/"))[0][0]
    slots = slots_from_gpt(gpt.read_disk_gpt(disk), image_id)
    for s in slots:
        s.running = any(n == s.usr.number for _, n in under)
    try:
        esp = boot_entries.find_esp()
        entries = boot_entries.list_entries(esp)
        boot_entries.apply_bootctl(entries)
    except (OSError, FileNotFoundError) as err:
        notes.append(f"boot entries unavailable: {err}")
        esp, entries = None, []
    link_entries(slots, entries)
    booted = next((e for e in entries if e.booted), None)
    default = next((e for e in entries if e.default), None)
    pending = None
    if default is not None and default.version != version and default.state != "bad":
        pending = default.version
    selected = boot_entries.efi_var("LoaderEntrySelected")
    if booted is None and selected:
        notes.append(f"the boot loader started {selected}, which is no longer on the ESP")
    if booted is not None and booted.version != version:
        notes.append(f"switched without a firmware reboot: the boot loader started "
                     f"{booted.version}, /usr runs {version}")
    failures = bootlog.failed_tries({e.id.lower(): e.state for e in entries})
    by_entry: dict[str, list[dict[str, Any]]] = {}
    for t in failures:
        by_entry.setdefault(t.entry_id.lower(), []).append(t.to_json())
    bless = run_text([BLESS_BOOT, "status"]) if os.path.exists(BLESS_BOOT) else ""
    complete = run_text(["systemctl", "is-active", "boot-complete.target"])
    loader_state = None
    if esp is not None:
        try:
            loader_state = loader.status_json(esp, version, entries)
        except OSError as err:
            notes.append(f"boot loader state unavailable: {err}")
    return {
        "id": image_id,
        "version": version,
        "running_slot": next((s.name for s in slots if s.running), None),
        "disk": f"/dev/{disk}",
        "esp": str(esp) if esp else None,
        "booted_entry": booted.path.name if booted else None,
        "boot_assessment": {"bless_boot": bless or None, "boot_complete": complete or None,
                            "marked_good": bless in ("good", "clean")},
        "slots": [s.to_json() for s in slots],
        "entries": [e.to_json() | {"notes": e.notes,
                                   "failures": by_entry.get(e.id.lower(), [])}
                    for e in entries],
        "failed_tries": [t.to_json() for t in failures],
        "pending": pending,
        "update_source": update_source(),
        "loader": loader_state,
        "root": encryption.root_state(),
        "etc": {"derived_from": etcmerge.stamp_version(Path("/etc")),
                "conflicts": etcmerge.conflicts(Path("/etc"))},
        "notes": notes,
    }


def _describe_entry(e: dict[str, Any]) -> str:
    state = e["state"]
    if state == "pending":
        state = f"being tried ({e['tries_left']} left, {e['tries_done']} done)"
    elif state == "bad":
        state = f"bad (no tries left, {e['tries_done']} done)"
    flags = [f for f in ("default", "booted") if e[f]]
    extra = f"  [{', '.join(flags)}]" if flags else ""
    notes = f"  ({'; '.join(e['notes'])})" if e.get("notes") else ""
    return f"{e['file']:<44} {e['version']:<14} {state}{extra}{notes}"


def render(st: dict[str, Any]) -> str:
    ba = st["boot_assessment"]
    good = {"good": "marked good", "clean": "good (this entry is not boot-counted)",
            "indeterminate": "not yet marked good (assessment running)",
            "bad": "marked bad"}.get(ba["bless_boot"] or "", "unknown")
    lines = [
        f"{st['id']} {st['version']}  (running from slot {st['running_slot'] or '?'}, "
        f"boot entry {st['booted_entry'] or '?'})",
        f"this boot:  {good}; boot-complete.target {ba['boot_complete'] or '?'}",
        "slots:",
    ]
    for s in st["slots"]:
        lines.append(f"  {s['slot']}  {s['label']:<36} {s['state']:<13} usr #{s['usr_partition']}"
                     f" {s['usr_uuid'][:8]}…  verity #{s['verity_partition']}")
    lines.append("boot entries (in boot order):")
    lines += [f"  {_describe_entry(e)}" for e in st["entries"]] or ["  (none found)"]
    if st["pending"]:
        lines.append(f"pending:    {st['pending']} boots next (reboot, or switch with "
                     "`particle update --soft`)")
    else:
        lines.append("pending:    nothing; the next boot runs this version")
    lines.append(f"updates:    {st['update_source'] or 'no update source in this image'}")
    if st.get("loader"):
        lines.append(loader.render(st["loader"]))
    if "root" in st:
        lines.append(encryption.render_root(st["root"]))
    for t in st.get("failed_tries", []):
        lines.append(f"failed:     {t['version']} try {t['try'] or '?'} (boot {t['boot']}): "
                     f"{t['how']}")
    for c in st.get("etc", {}).get("conflicts", []):
        beside = (f"new factory version in {c['new_factory_version']}"
                  if c["new_factory_version"] else "removed from the factory /etc")
        lines.append(f"/etc conflict: {c['path']} kept as changed here; {beside} "
                     f"(since {c['since']}; `particle etc diff {c['path']}`)")
    lines += [f"note:       {n}" for n in st["notes"]]
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    try:
        st = collect()
    except (OSError, gpt.GptError) as err:
        raise MachineError(f"cannot read the machine's state: {err}") from err
    if args.json or getattr(args, "status_json", False):
        print(json.dumps(st, indent=2))
    else:
        print(render(st))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("status", help="running version, A/B slots, boot entries, pending update")
    p.add_argument("--json", dest="status_json", action="store_true",
                   help="machine-readable output")
    p.set_defaults(func=cmd_status)
