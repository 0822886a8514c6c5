"""`particle install DEVICE`: copy the running version onto another disk.

The layout, the refusal rules and the copy are shared with the host's `particle install IMAGE
TARGET` (which imports this module): the target gets the source's partitions at the same
offsets and sizes, the ESP and one filled /usr slot copied, the other slot empty (`_empty`, as
the builder makes it), and a GPT whose backup header sits at the end of the target. Root is
copied from a built image (its ext4 grows at the first boot); on a machine it is left out and
systemd-repart creates it at the target's first boot (see `plan`).

Standard library only (python3-minimal): no shutil, uuid, tempfile.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import os
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from .. import formats

MiB = 1 << 20
CHUNK = MiB
ZEROS = bytes(CHUNK)
# A machine install leaves root to systemd-repart: the target needs room for one.
MIN_ROOT = 256 * MiB
USR_TYPES = frozenset({formats.USR, formats.USR_VERITY, formats.USR_VERITY_SIG})
SYS_BLOCK = Path("/sys/class/block")
BLKZEROOUT = 0x127F  # _IO(0x12, 127): zero a byte range of a block device
BLKRRPART = 0x125F  # _IO(0x12, 95): re-read the partition table
BACKUP_BYTES = (1 + formats.GPT_ENTRIES * formats.GPT_ENTRY_SIZE // formats.SECTOR_SIZE) \
    * formats.SECTOR_SIZE


class InstallError(Exception):
    """A target or source that cannot be used, said in a sentence."""


def align_up(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def human(n: int) -> str:
    for unit, factor in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", 1 << 10)):
        if n >= factor:
            v = n / factor
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n} B"


# --- what goes where -------------------------------------------------------------------------

@dataclass(frozen=True)
class Piece:
    """One partition of the target: its GPT entry, and whether its content is copied from the
    same offset of the source (the geometry is kept, so offsets are the same on both)."""

    part: formats.GptPartition
    copy: bool


@dataclass(frozen=True)
class Plan:
    pieces: list[Piece]
    needed: int  # the smallest target, in bytes
    left_out: list[str] = field(default_factory=list)

    def describe(self) -> list[str]:
        lines = []
        for pc in self.pieces:
            p = pc.part
            what = "copied" if pc.copy else "empty"
            lines.append(f"  {p.number}: {p.label or '-':<36} {human(p.size()):>9}  {what}")
        return lines


def plan(source: list[formats.GptPartition], keep: set[int], *, with_root: bool,
         new_esp_uuid: bool = False, new_guid: Callable[[], str] = formats.random_guid) -> Plan:
    """The target's partitions from the source's: the ESP and the usr partitions numbered in
    `keep` (one slot) are copied, every other usr partition becomes an empty slot (label
    `_empty`, a new UUID unless it was empty already: two disks must not offer the same
    PARTUUID for a version only one of them has), root is copied only `with_root`. With
    `new_esp_uuid` the ESP gets a new UUID: a copy made on a machine may stay attached to it,
    and the initrd finds the disk it booted from by the ESP's UUID (LoaderDevicePartUUID).

    Why a machine's root is left out rather than copied or made here: its content is this
    machine's state (never wanted on another disk), and systemd-repart in the target's initrd
    creates root sized to that disk, formatted, on the same path a factory reset or a reset
    cut short by a power loss takes, so one mechanism is exercised everywhere; the running
    machine needs no mkfs and no knowledge of the target's final size."""
    pieces: list[Piece] = []
    left_out: list[str] = []
    for p in source:
        if p.type == formats.ESP:
            pieces.append(Piece(replace(p, uuid=new_guid()) if new_esp_uuid else p, True))
        elif p.type in USR_TYPES:
            if p.number in keep:
                pieces.append(Piece(p, True))
            elif p.label == formats.EMPTY_LABEL:
                pieces.append(Piece(p, False))
            else:
                pieces.append(Piece(replace(p, label=formats.EMPTY_LABEL, uuid=new_guid()), False))
        elif p.type == formats.ROOT and with_root:
            pieces.append(Piece(p, True))
        else:
            left_out.append(f"partition {p.number} ({p.label or p.type})")
    if not any(pc.copy and pc.part.type == formats.USR for pc in pieces):
        raise InstallError("the source has no /usr partition to copy")
    if not any(pc.part.type == formats.ESP for pc in pieces):
        raise InstallError("the source has no ESP (EFI system partition)")
    end = max(pc.part.last_lba + 1 for pc in pieces) * formats.SECTOR_SIZE
    if not with_root:
        end = align_up(end, MiB) + MIN_ROOT
    return Plan(pieces, end + BACKUP_BYTES, left_out)


# --- may this target be written? -------------------------------------------------------------

@dataclass
class TargetState:
    name: str  # as the user named it
    block: bool
    size: int
    sector: int = formats.SECTOR_SIZE
    in_use: list[str] = field(default_factory=list)  # mounted, swap, held by dm/md
    signatures: list[str] = field(default_factory=list)  # "vdb1: ext4"
    source: str | None = None  # why it is the source itself ("the disk this system runs from")


def refusals(state: TargetState, needed: int, *, force: bool) -> list[str]:
    """Every reason not to write the target. `--force` overrides only non-empty content: a
    target in use (mounted, swap, under dm) or the source itself is never written."""
    problems = []
    if state.source:
        problems.append(f"{state.name} is {state.source}")
    for use in state.in_use:
        problems.append(f"{state.name} is in use: {use} (unmount or stop it first)")
    if state.signatures and not force:
        problems.append(f"{state.name} is not empty ({', '.join(state.signatures)}); "
                        "pass --force to overwrite it")
    if state.sector != formats.SECTOR_SIZE:
        problems.append(f"{state.name} has {state.sector}-byte sectors; the image's partition "
                        f"table is for {formats.SECTOR_SIZE}-byte sectors")
    if state.size < needed:
        problems.append(f"{state.name} ({human(state.size)}) is too small: at least "
                        f"{human(needed)} are needed")
    return problems


def inspect_block(device: str, probe: Callable[[str], list[str]],
                  sys_block: Path = SYS_BLOCK, proc: Path = Path("/proc")) -> TargetState:
    """What is on a whole disk and its partitions, read from sysfs and /proc (never from the
    disk itself except through `probe`, a read-only signature scan such as `wipefs -n`)."""
    name = os.path.basename(os.path.realpath(device))
    node = sys_block / name
    if not (node / "dev").exists():
        raise InstallError(f"{device} is not a block device")
    if (node / "partition").exists():
        raise InstallError(f"{device} is a partition: name the whole disk "
                           f"(/dev/{node.resolve().parent.name})")
    size = int((node / "size").read_text()) * 512
    sector = int((node / "queue/logical_block_size").read_text())
    devs = [name, *sorted(c.name for c in node.resolve().iterdir()
                          if (c / "partition").exists())]
    numbers = {(sys_block / d / "dev").read_text().strip(): d for d in devs}
    in_use = []
    with contextlib.suppress(OSError):
        for line in (proc / "self/mountinfo").read_text().splitlines():
            f = line.split()
            if len(f) > 4 and f[2] in numbers:
                in_use.append(f"/dev/{numbers[f[2]]} is mounted on {f[4]}")
    with contextlib.suppress(OSError):
        for line in (proc / "swaps").read_text().splitlines()[1:]:
            dev = os.path.basename(os.path.realpath(line.split()[0])) if line.split() else ""
            if dev in devs:
                in_use.append(f"/dev/{dev} is swap")
    for d in devs:
        holders = sys_block / d / "holders"
        for h in sorted(holders.iterdir()) if holders.is_dir() else []:
            in_use.append(f"/dev/{d} is held by {h.name}")
    signatures = [s for d in devs for s in probe(f"/dev/{d}")]
    return TargetState(device, True, size, sector, in_use, signatures)


def parse_wipefs(text: str) -> list[str]:
    """`wipefs --no-act --json` output as "device: type" lines (it prints nothing when clean)."""
    if not text.strip():
        return []
    found = json.loads(text).get("signatures", [])
    return sorted({f"{s.get('device')}: {s.get('type')}" for s in found})


# --- writing ---------------------------------------------------------------------------------

def _extents(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """Data ranges of [start, end) of a file (holes skipped); the whole range for a device."""
    out, pos = [], start
    try:
        while pos < end:
            try:
                a = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break
                raise
            if a >= end:
                break
            b = min(os.lseek(fd, a, os.SEEK_HOLE), end)
            out.append((a, b))
            pos = b
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENXIO):
            raise
        return [(start, end)]
    return out


def zero_range(fd: int, offset: int, length: int, block: bool) -> None:
    """Make [offset, offset+length) of the target read as zeros. A fresh file already does;
    a block device is told to zero it (BLKZEROOUT: the device or the kernel writes the zeros)."""
    if not block or length <= 0:
        return
    try:
        fcntl.ioctl(fd, BLKZEROOUT, struct.pack("QQ", offset, length))
        return
    except OSError:
        pass
    pos = offset
    while pos < offset + length:
        n = min(CHUNK, offset + length - pos)
        os.pwrite(fd, ZEROS[:n], pos)
        pos += n


def copy_range(src: int, dst: int, offset: int, length: int, block: bool = False,
               to: int | None = None) -> None:
    """Copy [offset, offset+length) from src to dst at `to` (default: the same offset), leaving
    out holes and all-zero chunks so a sparse target stays sparse. On a block device what is
    left out is zeroed (zero_range, one call per run), so each byte of the range is written
    once."""
    shift = (offset if to is None else to) - offset
    end = offset + length
    skipped = offset  # where the run of bytes left out so far begins
    for a, b in _extents(src, offset, end):
        pos = a
        while pos < b:
            chunk = os.pread(src, min(CHUNK, b - pos), pos)
            if not chunk:
                raise InstallError(f"the source ended at byte {pos} (expected {b})")
            if chunk != ZEROS[:len(chunk)]:
                zero_range(dst, skipped + shift, pos - skipped, block)
                view = memoryview(chunk)
                done = 0
                while done < len(chunk):
                    done += os.pwrite(dst, view[done:], pos + shift + done)
                skipped = pos + len(chunk)
            pos += len(chunk)
    zero_range(dst, skipped + shift, end - skipped, block)


def write_disk(src: int, dst: int, the_plan: Plan, disk_bytes: int, *, block: bool,
               say: Callable[[str], None] = print) -> None:
    """Put the planned partitions on the target. Order: the old partition table is wiped
    first, the contents are written and flushed, the new GPT (primary and backup) goes last
    and is flushed: a disk interrupted before the end has no partition table, never one that
    points at half-written partitions."""
    head = the_plan.pieces[0].part.start() if the_plan.pieces else MiB
    zero_range(dst, 0, min(head, MiB), block)
    zero_range(dst, disk_bytes - BACKUP_BYTES, BACKUP_BYTES, block)
    os.fsync(dst)
    for pc in the_plan.pieces:
        p = pc.part
        say(f"partition {p.number} ({p.label}, {human(p.size())}): "
            f"{'copying' if pc.copy else 'empty'}")
        if pc.copy:
            copy_range(src, dst, p.start(), p.size(), block)
        else:  # no stale file system signature at either end of an empty slot
            zero_range(dst, p.start(), min(MiB, p.size()), block)
            zero_range(dst, p.start() + p.size() - min(MiB, p.size()), min(MiB, p.size()),
                       block)
    os.fsync(dst)
    for offset, data in formats.gpt_writes([pc.part for pc in the_plan.pieces], disk_bytes,
                                           formats.random_guid()):
        os.pwrite(dst, data, offset)
    os.fsync(dst)


def confirm(question: str, yes: bool) -> bool:
    """Ask on the terminal unless --yes; without a terminal, refuse (a script must say --yes)."""
    if yes:
        return True
    if not sys.stdin.isatty():
        raise InstallError("standard input is not a terminal: pass --yes to confirm")
    try:
        answer = input(f"{question} [y/N] ")
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")


# --- on the machine --------------------------------------------------------------------------

def _wipefs(dev: str) -> list[str]:
    proc = subprocess.run(["wipefs", "--no-act", "--json", dev], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise InstallError(f"wipefs could not read {dev}: {proc.stderr.strip()}")
    return parse_wipefs(proc.stdout)


def _run(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise InstallError(f"{' '.join(argv)} failed: {proc.stderr.strip() or proc.stdout}")


@contextlib.contextmanager
def _mounted(device: str, where: Path) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    _run(["mount", "-t", "vfat", device, str(where)])
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], capture_output=True, check=False)
        with contextlib.suppress(OSError):
            where.rmdir()


def prune_esp(esp: Path, keep: set[str]) -> list[str]:
    """Leave on the target's ESP only the UKIs of the copied version (`keep`: file names): a
    UKI of the other version would name a /usr the target does not have. The boot loader's
    random seed goes too: two machines must not share it."""
    removed = []
    linux = esp / "EFI/Linux"
    for f in sorted(linux.iterdir()) if linux.is_dir() else []:
        if f.is_file() and f.name not in keep:
            f.unlink()
            removed.append(f.name)
    with contextlib.suppress(FileNotFoundError):
        (esp / "loader/random-seed").unlink()
    return removed


def running_source() -> tuple[str, list[formats.GptPartition], set[int], str]:
    """(disk, its GPT, the partition numbers of the running /usr slot, running version)."""
    from . import gpt
    from .entries import running_image

    under = gpt.partitions_under(gpt.block_of("/usr"))
    if not under:
        raise InstallError("/usr is not on a partition of a disk (is this a ParticleOS image?)")
    disk = under[0][0]
    parts = gpt.read_disk_gpt(disk)
    keep = {n for _, n in under}
    labels = {p.label for p in parts if p.number in keep}
    keep |= {p.number for p in parts if p.type == formats.USR_VERITY_SIG and p.label in labels}
    version = running_image()[1]
    return disk, parts, keep, version


def running_ukis(esp: Path, parts: list[formats.GptPartition], keep: set[int]) -> set[str]:
    """File names of the UKIs that boot the running slot (their usrhash= names its UUIDs)."""
    from . import entries

    uuids = {p.uuid.lower() for p in parts if p.number in keep}
    return {e.path.name for e in entries.list_entries(esp)
            if e.usr_uuids and set(e.usr_uuids) <= uuids}


def cmd_install(args: argparse.Namespace) -> int:
    from . import entries, gpt
    from .cli import MachineError
    from .reset import definitions_with

    try:
        if not definitions_with("Type", ("root",)):
            raise InstallError(
                "this image has no systemd-repart root definition (/usr/lib/repart.d; images of "
                "Debian 12 have none): the copy would boot without a root partition. Install "
                "the image from a host instead: particle install IMAGE DEVICE")
        disk, parts, keep, version = running_source()
        esp = entries.find_esp()
        ukis = running_ukis(esp, parts, keep)
        if not ukis:
            raise InstallError(f"no UKI on {esp}/EFI/Linux boots the running /usr")
        the_plan = plan(parts, keep, with_root=False, new_esp_uuid=True)
        state = inspect_block(args.device, _wipefs)
        target = os.path.basename(os.path.realpath(args.device))
        if target == disk:
            state.source = "the disk this system runs from"
        problems = refusals(state, the_plan.needed, force=args.force)
        if problems:
            raise InstallError("; ".join(problems))
        print(f"install {version} from /dev/{disk} onto {args.device} ({human(state.size)}):")
        print("\n".join(the_plan.describe()))
        print("  root: created by systemd-repart at the first boot of the new disk")
        if not confirm(f"Everything on {args.device} is lost. Write it?", args.yes):
            print("nothing written")
            return 1
        os.sync()  # the ESP is mounted: its latest writes are on the disk before it is read
        src = os.open(f"/dev/{disk}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            # O_EXCL on a block device: refused while anything has it mounted or open exclusively.
            dst = os.open(args.device, os.O_RDWR | os.O_EXCL | os.O_CLOEXEC)
            try:
                write_disk(src, dst, the_plan, state.size, block=True)
                fcntl.ioctl(dst, BLKRRPART)
            finally:
                os.close(dst)
        finally:
            os.close(src)
        subprocess.run(["udevadm", "settle"], capture_output=True, check=False)
        esp_number = next(pc.part.number for pc in the_plan.pieces
                          if pc.part.type == formats.ESP)
        with _mounted(gpt.partition_device(target, esp_number),
                      Path("/run/particle/install-esp")) as where:
            removed = prune_esp(where, ukis)
            os.sync()
        os.sync()
    except (InstallError, OSError, formats.GptError) as err:
        raise MachineError(str(err)) from err
    if removed:
        print(f"left out of the new ESP: {', '.join(removed)}")
    print(f"installed {version} on {args.device}; its first boot creates root and fills the disk")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("install", help="copy the running version onto another disk")
    p.add_argument("device", help="a whole disk, e.g. /dev/vdb (everything on it is lost)")
    p.add_argument("--force", action="store_true",
                   help="overwrite a disk that holds partitions or file systems")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.set_defaults(func=cmd_install)
