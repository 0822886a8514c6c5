"""The one place where external programs run: logged with --verbose, timed, failures explained."""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType

from .errors import CommandError, Interrupted, MissingToolError
from .ui import ui

# Debian package that provides each host program we call; used in "missing tool" errors.
PACKAGE_OF = {
    "mmdebstrap": "mmdebstrap",
    "mkfs.erofs": "erofs-utils",
    "mksquashfs": "squashfs-tools",
    "veritysetup": "cryptsetup-bin",
    "mkfs.vfat": "dosfstools",
    "mkfs.ext4": "e2fsprogs",
    "mcopy": "mtools",
    "mmd": "mtools",
    "qemu-system-x86_64": "qemu-system-x86",
    "swtpm": "swtpm",
    "qemu-img": "qemu-utils",
    "unshare": "util-linux",
    "setpriv": "util-linux",
    "chroot": "coreutils",
    "systemctl": "systemd",
    "gpg": "gnupg",
    "gpgv": "gnupg",
    "systemd-nspawn": "systemd-container",
    "mount": "mount",
}


def require(tool: str) -> str:
    """Path of a host program, or a MissingToolError naming its Debian package."""
    path = shutil.which(tool)
    if path is None:
        raise MissingToolError(tool, PACKAGE_OF.get(tool, tool))
    return path


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    what: str | None = None,
    capture: bool = False,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[bytes]:
    """Run a program. stderr is always captured (shown on failure); stdout only with capture.

    With --verbose the command line and its duration are printed and stderr streams through.
    """
    args = [os.fspath(a) for a in argv]
    require(args[0])
    label = what or Path(args[0]).name
    ui.debug(f"$ {shlex.join(args)}")
    full_env = None
    if env is not None:
        full_env = dict(os.environ)
        full_env.update(env)
    start = time.monotonic()
    # Its own process group, so that an interrupt stops the program and everything it started
    # (mmdebstrap's apt and dpkg, a chroot's commands) before the build removes their tree.
    with subprocess.Popen(
        args,
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE if capture else (None if ui.verbose else subprocess.DEVNULL),
        stderr=subprocess.PIPE,
        env=full_env,
        cwd=cwd,
        process_group=0,
    ) as popen:
        try:
            out, err = popen.communicate(input)
        except BaseException:
            stop_group(popen)
            raise
    proc = subprocess.CompletedProcess(args, popen.returncode, out, err)
    elapsed = time.monotonic() - start
    stderr = proc.stderr.decode(errors="replace")
    if ui.verbose and stderr.strip():
        ui.console.print(stderr.rstrip(), markup=False, highlight=False, style="dim")
    ui.debug(f"  ({label}: {elapsed:.1f} s, exit {proc.returncode})")
    if check and proc.returncode != 0:
        raise CommandError(label, args, proc.returncode, stderr or _decoded(proc.stdout))
    return proc


def stop_group(popen: subprocess.Popen[bytes], grace: float = 15.0) -> None:
    """SIGTERM the child's process group (programs such as mmdebstrap then unmount and clean
    up), SIGKILL what is left after `grace` seconds, and wait for the child."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, None)):
        try:
            os.killpg(popen.pid, sig)
        except ProcessLookupError:
            break
        try:
            popen.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM:
            # The leader is gone; anything it left in its group goes too.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(popen.pid, signal.SIGKILL)
        break
    popen.wait()


def spawn(
    argv: Sequence[str | os.PathLike[str]],
    *,
    foreground: bool = False,
    stdin: int | None = None,
    stdout: int | None = None,
    stderr: int | None = None,
) -> subprocess.Popen[bytes]:
    """Start a long-running program the caller watches and ends with stop() (a container and
    its console). `stdin`/`stdout`/`stderr` as subprocess takes them (None: ours). With
    `foreground` it stays in our process group, so that it may own the terminal (read it, put
    it in raw mode); otherwise it gets its own group, as run() does."""
    args = [os.fspath(a) for a in argv]
    require(args[0])
    ui.debug(f"$ {shlex.join(args)}")
    return subprocess.Popen(args, stdin=stdin, stdout=stdout, stderr=stderr,
                            process_group=None if foreground else 0)


def stop(popen: subprocess.Popen[bytes], grace: float = 15.0) -> int:
    """End a spawned program in order: SIGTERM to it alone (systemd-nspawn then shuts its
    container down cleanly), SIGKILL after `grace` seconds (to its whole process group when it
    has its own). Waits for it and returns its exit status."""
    if popen.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            popen.send_signal(signal.SIGTERM)
        try:
            popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                if os.getpgid(popen.pid) == popen.pid:
                    os.killpg(popen.pid, signal.SIGKILL)
                else:
                    popen.kill()
    return popen.wait()


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """SIGINT and SIGTERM raise Interrupted (once), so a killed build unwinds like Ctrl-C: the
    running command's process group is stopped and waited for, temporaries are removed. A
    second signal during that cleanup is ignored rather than cutting it short."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        if not fired:
            fired.append(signum)
            raise Interrupted(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def output(argv: Sequence[str | os.PathLike[str]], **kw: object) -> str:
    """Run a program and return its stdout as text."""
    proc = run(argv, capture=True, **kw)  # type: ignore[arg-type]
    return proc.stdout.decode()


def _decoded(data: bytes | None) -> str:
    return data.decode(errors="replace") if data else ""
