"""`particle overlay`: a writable /usr for experiments until the next boot, like
`rpm-ostree usroverlay`. An overlayfs goes over the verified /usr (and over any merged
extensions) with its upper layer in /run, so every change lives in RAM and is gone after a
reboot; the verity-protected /usr itself is never touched. Standard library only.

For `particle status`: overlay_active() tells whether the overlay is in place.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from .sysext import run

OVERLAY_DIR: Final = Path("/run/particle/overlay")
SOURCE: Final = "particle-overlay"  # the mount's source name: how we recognise our overlay
MOUNTINFO: Final = Path("/proc/self/mountinfo")


def overlay_active(mountinfo: Path = MOUNTINFO) -> bool:
    """True while /usr is our transient writable overlay (until the next boot)."""
    try:
        text = mountinfo.read_text()
    except OSError:
        return False
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, fs = left.split(), right.split()
        if sep and len(fields) >= 5 and len(fs) >= 2 and fields[4] == "/usr" \
                and fs[0] == "overlay" and fs[1] == SOURCE:
            return True
    return False


def upper_dir() -> Path:
    return OVERLAY_DIR / "upper"


def mount_overlay(verbose: bool = False) -> None:
    """Put the overlay over whatever /usr is now. A fresh work directory each time: after a
    lazy unmount the old mount may still be busy with the previous one."""
    upper = upper_dir()
    work = OVERLAY_DIR / f"work-{time.monotonic_ns()}"
    for d in (upper, work):
        d.mkdir(parents=True, exist_ok=True)
    os.chmod(upper, 0o755)
    run(["mount", "-t", "overlay", SOURCE, "-o",
         f"lowerdir=/usr,upperdir={upper},workdir={work},index=off,metacopy=off", "/usr"],
        verbose=verbose)


@contextlib.contextmanager
def suspended(verbose: bool = False) -> Iterator[None]:
    """Lift the overlay while systemd-sysext re-merges /usr, then put it back on top with the
    same upper layer, so extensions can be added and removed while it is active."""
    if not overlay_active():
        yield
        return
    run(["umount", "--lazy", "/usr"], verbose=verbose)
    try:
        yield
    finally:
        mount_overlay(verbose)


def cmd_overlay(args: argparse.Namespace) -> int:
    if args.action == "status":
        active = overlay_active()
        if args.json:
            import json

            print(json.dumps({"active": active, "upper": str(upper_dir()) if active else None}))
        else:
            print(f"/usr overlay: {'ACTIVE until the next boot' if active else 'not active'}")
        return 0
    if overlay_active():
        print(f"/usr is already writable (overlay in {upper_dir()}) until the next boot")
        return 0
    mount_overlay(args.verbose)
    print("/usr is now writable until the next boot: changes go to "
          f"{upper_dir()} (in RAM) and are lost at reboot; the verified /usr is unchanged.")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "overlay", help="make /usr writable until the next boot (transient overlay)",
        description="Make /usr writable through a transient overlay (changes in RAM, gone "
                    "after a reboot), for experiments. `particle overlay status` tells "
                    "whether it is active.",
    )
    p.add_argument("action", nargs="?", choices=["on", "status"], default="on",
                   help="on (default): make /usr writable; status: report")
    p.set_defaults(func=cmd_overlay)
