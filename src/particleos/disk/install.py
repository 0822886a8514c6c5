"""`particle install IMAGE TARGET` on the host: a built disk image onto a disk or into a file
of any (larger) size. The layout, the refusal rules and the copy are the machine's own
(`particleos.machine.install`), so both installs give the same disk; only the inspection of
the target runs host tools, through the runner."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import formats, runner
from ..cache import atomic_file
from ..errors import ParticleError
from ..machine import install as life


@dataclass(frozen=True)
class Installed:
    target: Path
    size: int
    version: str
    pieces: int


def wipefs(path: str | os.PathLike[str]) -> list[str]:
    """Signatures on a device or file, read-only (`wipefs --no-act`)."""
    proc = runner.run(["wipefs", "--no-act", "--json", path], capture=True,
                      what=f"wipefs --no-act {path}")
    return life.parse_wipefs(proc.stdout.decode(errors="replace"))


def target_state(image: Path, target: Path, size: int | None) -> life.TargetState:
    """What the target is and holds. A regular file (or a new path) becomes `size` bytes (at
    least the image's); a block device keeps its own size."""
    try:
        st = target.stat()
    except FileNotFoundError:
        return life.TargetState(str(target), False, size or image.stat().st_size)
    if stat.S_ISBLK(st.st_mode):
        if size is not None:
            raise ParticleError(f"--size is for files: {target} is a block device of its own size")
        state = life.inspect_block(str(target), wipefs)
    elif stat.S_ISREG(st.st_mode):
        has_data = st.st_size > 0 and st.st_blocks > 0
        state = life.TargetState(str(target), False, size or max(st.st_size, image.stat().st_size),
                                 signatures=wipefs(target) if has_data else [])
        if has_data and not state.signatures:
            state.signatures = [f"{st.st_size} bytes of data"]
    else:
        raise ParticleError(f"{target} is neither a block device nor a regular file")
    with contextlib.suppress(OSError):
        if os.path.samefile(image, target):
            state.source = "the image being installed"
    return state


def image_version(parts: list[formats.GptPartition]) -> str:
    usr = next((p for p in parts if p.type == formats.USR and p.label != formats.EMPTY_LABEL),
               None)
    return usr.label.partition("_")[2] if usr else "?"


def install(image: Path, target: Path, *, size: int | None = None, force: bool = False,
            confirm: Callable[[str], bool] = lambda question: True,
            say: Callable[[str], None] = print) -> Installed:
    """Write `image` (a built disk image) to `target`: the image's partitions at the same
    offsets, its GPT rewritten for the target's size (backup header at the target's end).
    Root keeps the image's small ext4; systemd-repart grows it (and systemd-growfs its file
    system) at the first boot. A file target is written under a temporary name and renamed:
    an interrupted install leaves no half disk behind."""
    try:
        parts = formats.read_gpt(image)
    except (OSError, formats.GptError) as err:
        raise ParticleError(f"{image}: not a disk image with a GPT ({err})") from None
    used = {p.number for p in parts if p.type in life.USR_TYPES and p.label != formats.EMPTY_LABEL}
    try:
        plan = life.plan(parts, used, with_root=True)
    except life.InstallError as err:
        raise ParticleError(f"{image}: {err}") from None
    state = target_state(image, target, size)
    problems = life.refusals(state, plan.needed, force=force)
    if problems:
        raise ParticleError("; ".join(problems))
    version = image_version(parts)
    say(f"install {image.name} ({version}) onto {target} ({life.human(state.size)}):")
    for line in plan.describe():
        say(line)
    if not confirm(f"Everything on {target} is lost. Write it?"):
        raise ParticleError("nothing written (not confirmed)")
    src = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if state.block:
            dst = os.open(target, os.O_RDWR | os.O_EXCL | os.O_CLOEXEC)
            try:
                life.write_disk(src, dst, plan, state.size, block=True, say=say)
            finally:
                os.close(dst)
            runner.run(["blockdev", "--rereadpt", target], check=False,
                       what="blockdev --rereadpt")
        else:
            with atomic_file(target) as tmp:
                with open(tmp, "wb") as f:
                    f.truncate(state.size)  # sparse: only what is copied takes space
                dst = os.open(tmp, os.O_RDWR | os.O_CLOEXEC)
                try:
                    life.write_disk(src, dst, plan, state.size, block=False, say=say)
                finally:
                    os.close(dst)
    except OSError as err:
        raise ParticleError(f"writing {target} failed: {err}") from None
    finally:
        os.close(src)
    return Installed(target, state.size, version, len(plan.pieces))
