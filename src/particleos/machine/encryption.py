"""The encrypted root on the machine (`[image] encrypt = "tpm2"`): what `particle status` says
about it, and `particle encryption recovery-key`, which the image runs once at the first boot.

The LUKS2 header is read straight from the partition (its JSON area), so status needs no
cryptsetup binary. The recovery key is enrolled with systemd-cryptenroll, unlocking through the
TPM2; `--wipe-slot=recovery` in the same call removes any earlier recovery key, so a power cut
between enrolling and showing the key only means a new key at the next boot, never an
enrolled key nobody saw. The "done" mark is written after the key was shown (or written)."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from . import gpt
from .cli import MachineError
from .files import write_atomic

SYS_BLOCK = Path("/sys/class/block")
LUKS2_MAGIC = b"LUKS\xba\xbe"
LUKS2_BINARY_HEADER = 4096  # the JSON area follows the binary header
DONE = Path("/var/lib/particle/recovery-key")  # the unit's condition (builder/encryption.py)
CRYPTENROLL = "systemd-cryptenroll"
# systemd's recovery keys: 8 groups of 8 "modhex" characters.
RECOVERY_KEY = re.compile(r"\b[cbdefghijklnrtuv]{8}(?:-[cbdefghijklnrtuv]{8}){7}\b")


def luks_backing(name: str) -> str | None:
    """/dev node of the LUKS partition under the dm-crypt device `name` (e.g. dm-1), or None
    when `name` is not a LUKS mapping."""
    node = SYS_BLOCK / name
    try:
        uuid = (node / "dm/uuid").read_text().strip()
    except OSError:
        return None
    if not uuid.startswith("CRYPT-LUKS"):
        return None
    slaves = sorted(s.name for s in (node / "slaves").iterdir())
    return f"/dev/{slaves[0]}" if len(slaves) == 1 else None


def read_luks2(device: str) -> dict[str, Any]:
    """The JSON metadata of a LUKS2 header (keyslots, tokens, segments)."""
    with open(device, "rb") as f:
        binary = f.read(LUKS2_BINARY_HEADER)
        if binary[:6] != LUKS2_MAGIC or int.from_bytes(binary[6:8], "big") != 2:
            raise ValueError(f"{device} has no LUKS2 header")
        hdr_size = int.from_bytes(binary[8:16], "big")
        area = f.read(hdr_size - LUKS2_BINARY_HEADER)
    data: dict[str, Any] = json.loads(area.split(b"\0", 1)[0])
    return data


def describe(meta: dict[str, Any]) -> dict[str, Any]:
    """How a LUKS2 volume unlocks: its tokens (tpm2 with its PCRs, recovery) and key slots."""
    tokens = [t for t in meta.get("tokens", {}).values() if isinstance(t, dict)]
    tpm2 = [t for t in tokens if t.get("type") == "systemd-tpm2"]
    recovery = [t for t in tokens if t.get("type") == "systemd-recovery"]
    unlock = [f"tpm2 (PCR {'+'.join(str(p) for p in t.get('tpm2-pcrs', [])) or 'none'})"
              for t in tpm2]
    if recovery:
        unlock.append("recovery key")
    used = {s for t in tokens for s in t.get("keyslots", [])}
    other = [s for s in meta.get("keyslots", {}) if s not in used]
    if other:
        unlock.append(f"passphrase ({len(other)} key slot{'s' if len(other) > 1 else ''})")
    return {"tpm2": bool(tpm2), "tpm2_pcrs": tpm2[0].get("tpm2-pcrs", []) if tpm2 else [],
            "recovery_key": bool(recovery), "keyslots": len(meta.get("keyslots", {})),
            "unlock": unlock}


def root_state() -> dict[str, Any]:
    """`particle status`'s root section: encrypted or not, and how it unlocks."""
    device = luks_backing(gpt.block_of("/"))
    if device is None:
        return {"encrypted": False}
    state: dict[str, Any] = {"encrypted": True, "device": device, "type": "LUKS2"}
    try:
        state |= describe(read_luks2(device))
    except (OSError, ValueError) as err:
        state["error"] = str(err)
    return state


def render_root(st: dict[str, Any]) -> str:
    if not st.get("encrypted"):
        return "root:       not encrypted"
    if "error" in st:
        return f"root:       encrypted ({st['device']}): cannot read its header: {st['error']}"
    how = ", ".join(st["unlock"]) or "no key slot"
    return (f"root:       encrypted, {st['type']} on {st['device']}; unlocks with {how}"
            + ("" if st["recovery_key"] else "; no recovery key yet"))


def enroll_recovery_key(device: str) -> str:
    """A new recovery key for `device`, unlocked through the TPM2; every older one wiped."""
    argv = [CRYPTENROLL, "--unlock-tpm2-device=auto", "--recovery-key",
            "--wipe-slot=recovery", device]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False,
                              env={**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_EMOJI": "0"})
    except (OSError, subprocess.TimeoutExpired) as err:
        raise MachineError(f"{CRYPTENROLL} did not run: {err}") from err
    out = proc.stdout + proc.stderr
    found = RECOVERY_KEY.search(out)
    if proc.returncode != 0 or found is None:
        raise MachineError(f"{CRYPTENROLL} could not enroll a recovery key for {device} "
                           f"(status {proc.returncode}): {out.strip()[-500:]}")
    return found.group(0)


def show_on_console(key: str, device: str) -> None:
    """The key on the console, once, framed so that it stands out among boot messages."""
    text = ("\n" + "=" * 72 + "\n"
            f"particle: RECOVERY KEY of the encrypted root ({device}):\n\n"
            f"    {key}\n\n"
            "It unlocks the root where the TPM2 cannot (another machine, a cleared TPM,\n"
            "changed Secure Boot keys): type it at the passphrase prompt. It is shown only\n"
            "this once: write it down and keep it away from this machine.\n"
            + "=" * 72 + "\n\n")
    try:
        with open("/dev/console", "w") as console:
            console.write(text)
            console.flush()
    except OSError:
        sys.stdout.write(text)
        sys.stdout.flush()


def cmd_recovery_key(args: argparse.Namespace) -> int:
    device = luks_backing(gpt.block_of("/"))
    if device is None:
        print("the root file system is not encrypted: no recovery key to make")
        return 0
    key = enroll_recovery_key(device)
    if args.to == "console":
        show_on_console(key, device)
    else:
        target = Path(args.to)
        if not target.is_absolute():
            raise MachineError(f"{args.to}: not an absolute path")
        write_atomic(target, (key + "\n").encode(), 0o600)
        print(f"particle: the recovery key of {device} is in {target}")
    write_atomic(DONE, f"{args.to}\n".encode(), 0o600)
    os.sync()
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    st = root_state()
    if args.json or getattr(args, "enc_json", False):
        print(json.dumps(st, indent=2))
    else:
        print(render_root(st))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("encryption", help="the encrypted root: how it unlocks, recovery key")
    verbs = p.add_subparsers(dest="encryption_verb", metavar="VERB")
    s = verbs.add_parser("status", help="encrypted or not, and how the root unlocks")
    s.add_argument("--json", dest="enc_json", action="store_true",
                   help="machine-readable output")
    s.set_defaults(func=cmd_status)
    r = verbs.add_parser(
        "recovery-key",
        help="make a new recovery key (replacing the old one) and show it or write it to a file")
    r.add_argument("--to", default="console",
                   help='"console" (default) or an absolute path to write the key to')
    r.set_defaults(func=cmd_recovery_key)
    p.set_defaults(func=cmd_status, enc_json=False)
