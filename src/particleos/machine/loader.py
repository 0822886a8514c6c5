"""Boot loader updates: systemd-boot on the ESP follows the version that runs, once that
version has booted good.

Every version carries in /usr the loader its ESP should have: the Secure Boot-signed copy that
`particle build` makes with [signing] (`systemd-bootx64.efi.signed`, the one bootctl prefers),
else the plain one (Debian's, or the spec's `[boot] loader`). Debian's
systemd-boot-update.service would install a newer one at every boot, also on a boot that is
still being tried, so images mask it; `particle-loader.service`, ordered after
systemd-bless-boot.service, runs `particle loader update` instead.

The rule (`decide`), for the version running from /usr:
* its loader is installed only when the boot loader started this very version (no soft switch)
  and its boot entry is good (blessed, no boot counter left in the file name);
* never a downgrade: a loader whose LoaderInfo version (`#### LoaderInfo: systemd-boot V ####`)
  is older than the ESP's stays out;
* same LoaderInfo version, other bytes (re-signed, e.g. a rotated Secure Boot key): the newer
  image version wins. The ESP records which version installed its loader (`STAMP`), so a
  rollback to an older version keeps the loader the newer one installed.

Each file is written as `NAME.new`, fsynced, renamed over NAME and its directory fsynced:
the stamp first, then /EFI/systemd/systemd-bootx64.efi, the fallback /EFI/BOOT/BOOTX64.EFI
last, so the ESP always holds a whole, working loader at the path the firmware starts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import entries as boot_entries
from .cli import MachineError
from .entries import Entry
from .files import write_atomic
from .versions import vercmp

EFI_DIR = Path("/usr/lib/systemd/boot/efi")
USR_LOADERS = (EFI_DIR / "systemd-bootx64.efi.signed", EFI_DIR / "systemd-bootx64.efi")
PRIMARY = "EFI/systemd/systemd-bootx64.efi"
FALLBACK = "EFI/BOOT/BOOTX64.EFI"
STAMP = "loader/particle-loader"  # "VERSION SHA256": the image version that installed the loader
OS_RELEASE = Path("/usr/lib/os-release")
EFIVARS = boot_entries.EFIVARS
_MAGIC = re.compile(rb"#### LoaderInfo: ([^#\0]{1,120}?) ####")


@dataclass
class LoaderFile:
    """One loader binary: where, its LoaderInfo string and digest (None when absent)."""

    path: str
    info: str | None = None  # e.g. "systemd-boot 257.13-1~deb13u1"
    sha256: str | None = None

    @property
    def exists(self) -> bool:
        return self.sha256 is not None

    @property
    def is_sdboot(self) -> bool:
        return (self.info or "").startswith("systemd-boot ")


def loader_info(data: bytes) -> str | None:
    """The LoaderInfo string systemd-boot embeds in its .sdmagic section (and reports in the
    LoaderInfo EFI variable once it runs)."""
    m = _MAGIC.search(data)
    return m.group(1).decode(errors="replace").strip() if m else None


def read_loader(path: Path) -> tuple[LoaderFile, bytes]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return LoaderFile(str(path)), b""
    return LoaderFile(str(path), loader_info(data), hashlib.sha256(data).hexdigest()), data


def info_version(info: str | None) -> str:
    """The version part of a LoaderInfo string ("systemd-boot 257.13-1" -> "257.13-1")."""
    return (info or "").rpartition(" ")[2]


def read_stamp(esp: Path) -> tuple[str, str] | None:
    try:
        version, _, digest = (esp / STAMP).read_text().strip().partition(" ")
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    return (version, digest) if version else None


@dataclass
class Decision:
    state: str  # none | current | kept | pending | install
    detail: str
    targets: tuple[str, ...] = ()  # ESP paths to write, in order (FALLBACK last)


def decide(usr: LoaderFile, primary: LoaderFile, fallback: LoaderFile,
           stamp: tuple[str, str] | None, version: str, blessed: str | None) -> Decision:
    """What to do with the running version's loader (`usr`) given the ESP's files. `blessed`
    is None when this boot of `version` is known good, else why it is not (yet)."""
    if not usr.exists:
        return Decision("none", "this version carries no systemd-boot in /usr")
    targets = tuple(rel for rel, f in ((PRIMARY, primary), (FALLBACK, fallback))
                    if f.sha256 != usr.sha256 and (rel == PRIMARY or f.is_sdboot or not f.exists))
    if not targets:
        return Decision("current", "the ESP has this version's loader")
    mine = info_version(usr.info)
    esp_file = primary if primary.exists else fallback
    theirs = info_version(esp_file.info) if esp_file.is_sdboot else ""
    if theirs and mine and vercmp(mine, theirs) < 0:
        return Decision("kept", f"this version's loader ({mine}) is older than the ESP's "
                                f"({theirs}): kept, never downgraded")
    if theirs and mine == theirs and stamp and vercmp(version, stamp[0]) < 0:
        return Decision("kept", f"the ESP's loader (same version {theirs}) was installed by "
                                f"the newer {stamp[0]}: kept")
    what = f"this version's loader ({usr.info or 'unknown version'})"
    if blessed is not None:
        return Decision("pending", f"{what} goes onto the ESP once this boot is marked good "
                                   f"({blessed})", targets)
    return Decision("install", f"{what} replaces the ESP's", targets)


def install(esp: Path, data: bytes, version: str, targets: tuple[str, ...]) -> None:
    """The stamp first (an interrupted install is finished by the next run of the same
    version), then the loaders in `targets` order."""
    digest = hashlib.sha256(data).hexdigest()
    # NAME.new beside NAME: a run cut short leaves it, and the next run writes it again.
    for target, content in ((esp / STAMP, f"{version} {digest}\n".encode()),
                            *((esp / rel, data) for rel in targets)):
        write_atomic(target, content, tmp=target.with_name(target.name + ".new"))


def blessed_reason(version: str, entries: list[Entry]) -> str | None:
    """None when the boot loader started `version` from a good entry; else why not. The
    booted entry is the one entries marks (LoaderEntrySelected, or bootctl's isSelected)."""
    booted = next((e for e in entries if e.booted), None)
    if booted is None:
        return "the boot entry this boot started is unknown"
    if booted.version != version:
        return f"switched without a firmware reboot from {booted.version}"
    if booted.state != "good":
        return "this boot is still being tried"
    return None


@dataclass
class LoaderState:
    running: str | None  # LoaderInfo of the systemd-boot that started this boot
    usr: LoaderFile
    esp: LoaderFile
    fallback: LoaderFile
    installed_by: str | None
    state: str
    detail: str

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["pending"] = self.state == "pending"
        return d


def examine(esp: Path, version: str,
            blessed: str | None) -> tuple[LoaderState, Decision, bytes]:
    """The loader's state on this machine, what the rule decides, and /usr's loader."""
    usr, data = next(((f, d) for f, d in map(read_loader, USR_LOADERS) if f.exists),
                     (LoaderFile(str(USR_LOADERS[-1])), b""))
    primary, _ = read_loader(esp / PRIMARY)
    fallback, _ = read_loader(esp / FALLBACK)
    stamp = read_stamp(esp)
    decision = decide(usr, primary, fallback, stamp, version, blessed)
    state = LoaderState(boot_entries.efi_var("LoaderInfo", EFIVARS), usr, primary, fallback,
                        stamp[0] if stamp else None, decision.state, decision.detail)
    return state, decision, data


def _machine() -> tuple[Path, str, str | None]:
    version = boot_entries.running_image(OS_RELEASE)[1]
    esp = boot_entries.find_esp()
    return esp, version, blessed_reason(version, boot_entries.list_entries(esp, EFIVARS))


def status_json(esp: Path, version: str, entries: list[Entry]) -> dict[str, Any]:
    """The `loader` part of `particle status`."""
    return examine(esp, version, blessed_reason(version, entries))[0].to_json()


def render(st: dict[str, Any]) -> str:
    esp = st["esp"]
    where = f"ESP {esp['info'] or 'no systemd-boot'}"
    if st.get("installed_by"):
        where += f" (installed by {st['installed_by']})"
    return f"loader:     {st['running'] or '?'} running; {where}; {st['detail']}"


def cmd_loader(args: argparse.Namespace) -> int:
    try:
        esp, version, blessed = _machine()
        state, decision, data = examine(esp, version, blessed)
    except OSError as err:
        raise MachineError(f"cannot read the boot loader's state: {err}") from err
    if args.loader_verb == "update" and decision.state == "install":
        try:
            install(esp, data, version, decision.targets)
        except OSError as err:
            raise MachineError(f"installing the boot loader on {esp} failed: {err} (the ESP "
                               "keeps a whole loader: the old or the new one)") from err
        state.esp, _ = read_loader(esp / PRIMARY)
        state.fallback, _ = read_loader(esp / FALLBACK)
        state.installed_by, state.state = version, "installed"
        state.detail = (f"installed {state.usr.info} from {state.usr.path} into "
                        f"{', '.join('/' + t for t in decision.targets)}; it starts the next boot")
    if args.json or getattr(args, "loader_json", False):
        print(json.dumps(state.to_json(), indent=2))
    else:
        print(render(state.to_json()))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("loader", help="the boot loader: running, on the ESP, this version's")
    p.add_argument("loader_verb", nargs="?", choices=("status", "update"), default="status",
                   help="update: install this version's loader if this boot is good and the "
                        "rule allows it (particle-loader.service runs it at every boot)")
    p.add_argument("--json", dest="loader_json", action="store_true",
                   help="machine-readable output")
    p.set_defaults(func=cmd_loader)
