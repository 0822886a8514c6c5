"""`particle shell` and `particle boot --container`: a build run under systemd-nspawn, the fast
loop where QEMU under TCG takes minutes (mkosi's `shell` and `boot` verbs are the anchors).

What runs is what ships: the build's own usr image, checked against the manifest's verity root
hash (the one its UKI pins) and mounted read-only through a loop device, under a root whose
/etc and /var come from the factory copies in that /usr, as the machine's first boot makes them
(and, in a kept root, merged by the image's own etcmerge at the first start of a new version).
The root is a throwaway directory removed at exit, or `--keep DIR` to keep its state.

Every mount lives in a private mount namespace (`unshare -m`) whose only process is nspawn:
when it ends, however it ends (poweroff, Ctrl-] three times, SIGTERM, SIGKILL), the kernel
drops the mounts and the loop device (set up with autoclear by `mount -o loop`) goes with
them. nspawn gets SIGTERM (a clean shutdown) if `particle` is killed outright. A container
that reboots makes nspawn exit with status 133; the boot then starts again on the same root,
like a machine that reboots.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, Final

from . import runner
from .cache import cache_root, work_dir
from .errors import ParticleError
from .ext.base import BuiltBase, find_base
from .formats import Manifest
from .runner import interruptible
from .ui import ui
from .vm import console_tail

NSPAWN: Final = "systemd-nspawn"
REBOOTED: Final = 133  # nspawn exits so when the container rebooted (its @.service restarts)
STOP_GRACE: Final = 60.0  # seconds for a clean shutdown after SIGTERM before SIGKILL
MULTI_USER: Final = re.compile(rb"Reached target .{0,40}?(?:multi-user\.target|Multi-User System)")

# Runs as the only process of a new mount namespace: mount /usr, make the root as the
# machine's boots do (with the particle-etc.sh the image's initrd runs), then become nspawn.
# Setup errors go to $log and $ready stays absent, so the caller can tell them from the
# container's own exit status.
_ENTER: Final = r"""
set -eu
image="$1"; fstype="$2"; root="$3"; log="$4"; ready="$5"; shift 5
{
    # nspawn keeps per-machine state here and cannot remove it again from a /run that is not
    # a tmpfs (a container host): a private tmpfs that vanishes with this namespace.
    mkdir -p /run/systemd/nspawn/propagate
    mount -t tmpfs -o mode=0700 tmpfs /run/systemd/nspawn/propagate
    mkdir -p "$root/usr"
    mount -t "$fstype" -o ro,loop "$image" "$root/usr"
    findmnt -no SOURCE "$root/usr" > "$(dirname "$ready")/loop" || true
    factory="$root/usr/share/factory"
    if [ ! -d "$factory/etc" ]; then
        echo "$image has no share/factory/etc: not a ParticleOS usr image"
        exit 1
    fi
    etc="$root/usr/lib/dracut/modules.d/90particle/particle-etc.sh"
    if [ ! -e "$etc" ]; then
        echo "$image has no lib/dracut/modules.d/90particle/particle-etc.sh: rebuild it"
        exit 1
    fi
    # What the initrd does at every boot: /etc and /var from the factory copy the first time,
    # then the /etc merge of the image's own etcmerge.
    out=$(PARTICLE_KMSG=/dev/null sh "$etc" "$root")
    for name in bin sbin lib lib64; do
        if [ -e "$root/usr/$name" ] && [ ! -e "$root/$name" ] && [ ! -L "$root/$name" ]; then
            ln -s "usr/$name" "$root/$name"
        fi
    done
    for name in dev proc sys run tmp root; do mkdir -p "$root/$name"; done
    chmod 1777 "$root/tmp"
} 2>"$log"
case "$out" in ""|*"/etc belongs to"*) ;; *) echo "$out" >&2 ;; esac
: > "$ready"
exec "$@"
"""


class ContainerError(ParticleError):
    """The container could not be set up, or did not do what --expect asked."""


@dataclass
class BootResult:
    """What `particle boot --container` reports (also as --json)."""

    id: str
    version: str
    root_hash: str
    exit_status: int
    boots: int = 0  # starts of the container: 1 + the reboots inside it
    multi_user_seconds: float | None = None  # first "Reached target multi-user.target"
    expect: str | None = None
    found_seconds: float | None = None  # when --expect matched
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def check_host() -> None:
    """nspawn and mounts need root, and the tools; say so before anything is made."""
    for tool in (NSPAWN, "setpriv", "unshare", "mount", "chroot"):
        runner.require(tool)
    if os.geteuid() != 0:
        raise ContainerError("systemd-nspawn and the loop mount of /usr need root",
                             hint="run particle with sudo")


def verify_usr(built: BuiltBase) -> None:
    """The usr image must be the one the manifest (and the UKI) names: `veritysetup verify`
    of the image against its hash tree and the manifest's root hash (0.4 s for 100 MiB)."""
    m = built.manifest
    tree = built.usr_image.with_name(f"{m.stem}.usr-verity.raw")
    if not tree.is_file():
        raise ContainerError(f"{tree.name} is missing: cannot check {built.usr_image.name} "
                             "against the manifest's root hash")
    proc = runner.run(["veritysetup", "verify", built.usr_image, tree, m.root_hash],
                      what="veritysetup verify", check=False)
    if proc.returncode != 0:
        raise ContainerError(
            f"{built.usr_image.name} does not match the root hash in {m.name} "
            f"({proc.stderr.decode(errors='replace').strip() or 'verification failed'})",
            hint="rebuild it with `particle build`",
        )


def attached_loops(image: Path) -> list[str]:
    """Loop devices whose backing file is `image` (from sysfs: no program needed)."""
    target = os.path.realpath(image)
    found = []
    for backing in sorted(Path("/sys/block").glob("loop*/loop/backing_file")):
        with contextlib.suppress(OSError):
            if backing.read_text().strip().removesuffix(" (deleted)") == target:
                found.append("/dev/" + backing.parent.parent.name)
    return found


class Container:
    """One build prepared to run: the checked usr image, a work directory (logs; the root too
    unless `keep`), and the command line that mounts and enters it."""

    def __init__(self, build_dir: Path, *, keep: Path | None = None,
                 version: str | None = None) -> None:
        self.built = find_base(build_dir, version)
        self.keep = keep
        self.work: Path | None = None

    @property
    def manifest(self) -> Manifest:
        return self.built.manifest

    @contextlib.contextmanager
    def prepared(self) -> Iterator[Container]:
        """Check the host and the image, own a work directory for the run (removed at the
        end, however it ends; swept by a later build if this process is killed outright)."""
        check_host()
        verify_usr(self.built)
        if self.keep is not None:
            if self.keep.exists() and not self.keep.is_dir():
                raise ContainerError(f"--keep {self.keep}: not a directory")
            self.keep.mkdir(parents=True, exist_ok=True)
        m = self.manifest
        path = cache_root() / "work" / f"container-{m.stem}-{uuid.uuid4().hex[:8]}"
        with interruptible(), work_dir(path) as work:
            self.work = work
            try:
                yield self
            finally:
                self._wait_released()
                self.work = None

    @property
    def root(self) -> Path:
        assert self.work is not None
        return self.keep.resolve() if self.keep is not None else self.work / "root"

    def argv(self, nspawn_args: Sequence[str]) -> list[str]:
        """setpriv -> unshare -> the set-up script -> systemd-nspawn with the root and
        `nspawn_args`."""
        assert self.work is not None
        m = self.manifest
        base = [NSPAWN, "--directory", str(self.root), f"--machine={_machine_name(m.id)}",
                "--register=no"]
        if not Path("/run/systemd/system").exists():
            # No systemd as PID 1 here (a container host): no scope unit to create.
            base.append("--keep-unit")
        if ui.quiet:
            base.append("--quiet")
        script = self.work / "enter.sh"
        if not script.exists():
            script.write_text(_ENTER)
        # SIGTERM to nspawn if particle itself dies (SIGKILL): the system shuts down and the
        # namespace with its mounts goes, rather than a container running on unwatched.
        return ["setpriv", "--pdeathsig", "TERM",
                "unshare", "--mount", "--propagation", "private", "sh", str(script),
                str(self.built.usr_image.resolve()), m.usr_filesystem, str(self.root),
                str(self.work / "setup.log"), str(self.work / "ready"), *base, *nspawn_args]

    def start(self, nspawn_args: Sequence[str], *, foreground: bool,
              stdin: int | None = None, stdout: int | None = None,
              stderr: int | None = None) -> subprocess.Popen[bytes]:
        assert self.work is not None
        (self.work / "ready").unlink(missing_ok=True)
        return runner.spawn(self.argv(nspawn_args), foreground=foreground, stdin=stdin,
                            stdout=stdout, stderr=stderr)

    def finished(self, status: int) -> int:
        """nspawn's exit status, or a ContainerError when the set-up before it failed."""
        assert self.work is not None
        if not (self.work / "ready").exists():
            log = self.work / "setup.log"
            text = log.read_text(errors="replace").strip() if log.exists() else ""
            raise ContainerError(
                f"could not set up the container of {self.built.usr_image.name} "
                f"(exit status {status})" + (f":\n  {text}" if text else ""),
                hint="the kernel needs loop devices and the file system of /usr "
                     f"({self.manifest.usr_filesystem})" if text else None,
            )
        return status

    def _wait_released(self, seconds: float = 10.0) -> None:
        """The kernel drops the namespace's mounts as nspawn ends; the loop device follows
        a moment later. Wait for the one this run used, so that 'exited' means 'released'
        (another container of the same build may share it: then it stays)."""
        assert self.work is not None
        used = self.work / "loop"
        device = used.read_text().strip() if used.exists() else ""
        deadline = time.monotonic() + seconds
        while device in attached_loops(self.built.usr_image) and time.monotonic() < deadline:
            time.sleep(0.1)
        if device in attached_loops(self.built.usr_image):
            ui.debug(f"{device} still backs {self.built.usr_image.name} (another container?)")


def _machine_name(image_id: str) -> str:
    """nspawn's machine name (also the hostname until the system sets its own)."""
    return re.sub(r"[^A-Za-z0-9-]", "-", image_id)[:64].strip("-") or "particle"


def on_terminal() -> bool:
    """stdin and stdout are a terminal: the container gets it (interactive console)."""
    return sys.stdin.isatty() and sys.stdout.isatty()


def shell(build_dir: Path, command: Sequence[str], *, keep: Path | None = None,
          version: str | None = None) -> int:
    """Run `command` (default: a login shell) in the build's system without booting it;
    returns its exit status. On a terminal it gets one (nspawn's pty); otherwise its stdin,
    stdout and stderr are ours, so it works in pipes and scripts."""
    c = Container(build_dir, keep=keep, version=version)
    terminal = on_terminal()
    args = ["--quiet", "--as-pid2", f"--console={'interactive' if terminal else 'pipe'}"]
    with c.prepared():
        ui.debug(f"shell in {c.manifest.id} {c.manifest.version} (root {c.root})")
        # A terminal on stdin: nspawn stays in our process group, or reading it would stop it.
        proc = c.start([*args, *(["--", *command] if command else [])],
                       foreground=sys.stdin.isatty())
        try:
            status = proc.wait()
        except BaseException:
            runner.stop(proc, grace=5.0)
            raise
        return c.finished(status)


def boot(build_dir: Path, *, keep: Path | None = None, version: str | None = None,
         expect: str | None = None, timeout: float = 600.0,
         console: IO[bytes] | None = None, terminal: bool = False) -> BootResult:
    """Boot the build's system with its own systemd as PID 1 (private network: its networkd
    must not configure the host's links). With `terminal` (and no `expect`) the console is our
    terminal (Ctrl-] three times ends it); otherwise it is copied to `console` (None: not
    shown) and watched for multi-user and `expect`. With `expect`, the container is shut down
    cleanly once it matches, and a ContainerError says why when it does not (timeout, the
    container ended)."""
    c = Container(build_dir, keep=keep, version=version)
    m = c.manifest
    result = BootResult(m.id, m.version, m.root_hash, exit_status=0, expect=expect)
    # What the UKI's command line says to the machine's systemd and matters here.
    args = ["--private-network", "--boot", "--", "systemd.firstboot=off"]
    attach = terminal and expect is None
    rx = re.compile(expect.encode()) if expect is not None else None
    with c.prepared():
        if not ui.quiet:
            ui.info(f"booting {m.id} {m.version} in a container"
                    + (" (Ctrl-] three times quits)" if attach else ""))
        start = time.monotonic()
        seen = bytearray()
        while True:
            result.boots += 1
            if attach:
                proc = c.start(["--console=interactive", *args], foreground=True)
                try:
                    status = proc.wait()
                except BaseException:
                    runner.stop(proc, grace=STOP_GRACE)
                    raise
            else:
                proc = c.start(["--console=read-only", *args], foreground=False,
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
                try:
                    status = _watch(proc, seen, start, result, rx, timeout, console)
                except BaseException:
                    shutdown(proc, seen, console)
                    raise
            status = c.finished(status)
            if status != REBOOTED or result.found_seconds is not None:
                break
        result.exit_status = status
        result.seconds = round(time.monotonic() - start, 1)
    if rx is not None and result.found_seconds is None:
        raise ContainerError(f"the container ended (exit status {status}); {expect!r} did "
                             "not appear" + console_tail(seen.decode(errors="replace")))
    return result


def _watch(proc: subprocess.Popen[bytes], seen: bytearray, start: float, result: BootResult,
           rx: re.Pattern[bytes] | None, timeout: float, console: IO[bytes] | None) -> int:
    """Copy one container run's console until it ends; note multi-user and the `rx` match
    (then shut the container down cleanly). Returns nspawn's exit status."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    while True:
        left = start + timeout - time.monotonic()
        if rx is not None and left <= 0:
            shutdown(proc, seen, console)
            raise ContainerError(f"timed out after {timeout:.0f} s waiting for "
                                 f"{rx.pattern.decode()!r}"
                                 + console_tail(seen.decode(errors="replace")))
        ready, _, _ = select.select([fd], [], [], max(0.0, min(left, 1.0)) if rx else 1.0)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            return proc.wait()
        begin = max(0, len(seen) - 256)
        _copy(chunk, seen, console)
        now = round(time.monotonic() - start, 1)
        if result.multi_user_seconds is None and MULTI_USER.search(seen, begin):
            result.multi_user_seconds = now
        if rx is not None and result.found_seconds is None and rx.search(seen, begin):
            result.found_seconds = now
            return shutdown(proc, seen, console)


def shutdown(proc: subprocess.Popen[bytes], seen: bytearray, console: IO[bytes] | None) -> int:
    """Shut the container down cleanly (nspawn turns SIGTERM into the system's poweroff) while
    its console is still read, so that a full pipe never stalls it; SIGKILL after STOP_GRACE."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE
    if proc.stdout is not None:
        fd = proc.stdout.fileno()
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([fd], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                _copy(chunk, seen, console)
    return runner.stop(proc, grace=max(5.0, deadline - time.monotonic()))


def _copy(chunk: bytes, seen: bytearray, console: IO[bytes] | None) -> None:
    seen.extend(chunk)
    if console is not None:
        console.write(chunk)
        console.flush()

