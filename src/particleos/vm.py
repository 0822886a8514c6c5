"""Boot images in QEMU with UEFI firmware and a serial console: for people (`particle qemu`)
and for tests, which drive the console with expect()/send().

KVM is used only when it really runs guest code here: a /dev/kvm node, or a vCPU that QEMU
creates but never starts, is not proof (DESIGN.md section 7). The probe runs the real firmware
for a moment; a boot whose QEMU still reports a KVM failure restarts under TCG by itself (with
`accel="auto"`), so a broken accelerator costs seconds, never a timeout. A guest that is known
dead (QEMU exited or paused the guest, the firmware found nothing to boot) makes expect() fail
at once instead of waiting for its timeout. Death is read from QEMU's own output (merged into
the console stream) rather than from QMP events: every pause a broken accelerator causes is
announced there, and it needs no socket and no second reader per boot."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Final, Literal

from . import runner
from .errors import ParticleError
from .firmware import find_ovmf, firmware_code, new_vars
from .ui import ui

__all__ = ["VM", "VMError", "VMOptions", "boot", "find_ovmf", "kvm_problem", "qemu_argv"]

Accel = Literal["auto", "kvm", "tcg"]
ACCELS: Final = ("auto", "kvm", "tcg")
QEMU: Final = "qemu-system-x86_64"
SWTPM: Final = "swtpm"
SWTPM_START_SECONDS: Final = 10.0  # until its control socket exists
PROBE_SECONDS: Final = 2.0  # a broken KVM shows its error within a second of starting OVMF
# What QEMU prints (on stderr, which a boot merges into the console stream) when KVM cannot run
# the guest: the guest is paused ("KVM internal error") or QEMU aborts (MSR assertion), or it
# refuses to start (SMM, needed by the Secure Boot firmware). Anchored on QEMU's own wording,
# so that guest output does not match by accident (QEMU's lines may follow console output
# that has no line end yet).
KVM_FAILURE: Final = re.compile(
    rb"KVM internal error\. Suberror: \d+"
    rb"|KVM: entry failed, hardware error[^\r\n]*"
    rb"|qemu-system-x86_64: [^\r\n]*(?:failed to set MSR|kvm[^\r\n]*Assertion"
    rb"|not supported by this hypervisor|failed to initialize kvm|Could not access KVM)"
    rb"[^\r\n]*"
)
# What OVMF prints on the serial console when no boot option worked: Debian's build falls back
# to its UEFI shell (measured: an empty disk under Debian 12's OVMF), builds without a shell
# (the Secure Boot one) say so. Either way nothing more will happen without a person typing.
NO_BOOT: Final = re.compile(
    rb'BdsDxe: No bootable option or device was found\.'
    rb'|BdsDxe: starting Boot[0-9A-F]{4} "EFI Internal Shell"'
)
_kvm_problems: dict[bool, str | None] = {}  # per secure_boot: None when KVM works
_told = False  # the "KVM does not work here" line is printed once per process


class VMError(ParticleError):
    """The guest did not do what was expected (timeout, power-off, dead); carries the console
    tail."""


def _machine(secure_boot: bool) -> tuple[str, list[str]]:
    """-machine value and extra arguments: only SMM code may write Secure Boot variables."""
    if secure_boot:
        return "q35,smm=on", ["-global", "driver=cfi.pflash01,property=secure,value=on"]
    return "q35", []


def _accel_args(accel: Literal["kvm", "tcg"]) -> list[str]:
    if accel == "kvm":
        return ["-accel", "kvm", "-cpu", "host", "-smp", "2"]
    # TCG: cmpxchg16b in the guest corrupts memory under QEMU 7.2's TCG; one vCPU.
    return ["-accel", "tcg", "-cpu", "qemu64,-cx16", "-smp", "1"]


def kvm_problem(*, secure_boot: bool = False) -> str | None:
    """Why KVM cannot run the firmware here, or None when it can. Runs the real OVMF (the
    Secure Boot build with SMM when `secure_boot`) under KVM for PROBE_SECONDS: usable only if
    QEMU is still running then and has printed no KVM error. Cached for the process."""
    if secure_boot in _kvm_problems:
        return _kvm_problems[secure_boot]
    runner.require(QEMU)
    machine, secure = _machine(secure_boot)
    with tempfile.TemporaryDirectory(prefix="particle-kvm-probe-") as tmp:
        vars_path = new_vars(Path(tmp) / "vars.fd")
        argv = [QEMU, "-machine", machine, *_accel_args("kvm"), "-m", "256", "-nodefaults",
                "-display", "none", "-no-user-config", "-monitor", "none", "-serial", "none",
                "-drive", f"if=pflash,format=raw,unit=0,readonly=on,"
                f"file={firmware_code(secure_boot=secure_boot)}",
                "-drive", f"if=pflash,format=raw,unit=1,file={vars_path}", *secure]
        ui.debug("$ " + " ".join(argv))
        out_path = Path(tmp) / "out"
        with out_path.open("wb") as out:
            try:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=subprocess.STDOUT)
            except OSError as err:
                problem: str | None = f"{QEMU} did not start ({err})"
            else:
                try:
                    status = proc.wait(PROBE_SECONDS)
                except subprocess.TimeoutExpired:
                    status = None
                    proc.kill()
                    proc.wait()
                text = out_path.read_bytes()
                m = KVM_FAILURE.search(text)
                if m:
                    problem = _line(m.group(0))
                elif status is not None:
                    last = _clean(text.decode(errors="replace")).strip().splitlines()
                    problem = (f"QEMU exited with status {status} while starting the firmware"
                               + (f": {last[-1].strip()}" if last else ""))
                else:
                    problem = None
    ui.debug(f"KVM usable{' with SMM' if secure_boot else ''}: {problem or 'yes'}")
    _kvm_problems[secure_boot] = problem
    return problem


def _line(raw: bytes) -> str:
    return raw.decode(errors="replace").strip().removeprefix(f"{QEMU}: ").removeprefix("error: ")


def _tell_fallback(reason: str, action: str) -> None:
    global _told
    if not _told:
        _told = True
        if not ui.quiet:  # one unwrapped line, and QEMU's text is not console markup
            ui.console.print(f"particle: KVM does not work here ({reason}); {action} under "
                             "TCG (slower, same guest)", soft_wrap=True, markup=False)


@dataclass
class VMOptions:
    memory_mib: int = 2048
    snapshot: bool = False
    vars_file: Path | None = None  # persistent UEFI variables; default: next to the image
    nic: list[str] | None = None  # -nic argument(s); None: user networking
    extra: list[str] = field(default_factory=list)
    echo: bool = False  # copy the console to our stdout
    log: Path | None = None  # copy the console to this file
    interactive: bool = False  # attach our terminal to the console (particle qemu)
    reboot: bool = True  # False: QEMU exits when the guest reboots
    secure_boot: bool = False  # SMM firmware that enforces Secure Boot (vars_file: enrolled)
    accel: Accel = "auto"  # auto: KVM when it runs the firmware, else (or if it fails) TCG
    tpm: Path | None = None  # a TPM2 (swtpm) whose state lives in this directory


def choose_accel(opts: VMOptions) -> Literal["kvm", "tcg"]:
    """The accelerator a boot starts with: `tcg` never probes; `kvm` fails at once (with the
    reason) where KVM cannot run the firmware; `auto` falls back to TCG and says why."""
    if opts.accel == "tcg":
        return "tcg"
    if opts.accel not in ACCELS:
        raise ParticleError(f"accelerator {opts.accel!r}: use one of {', '.join(ACCELS)}")
    problem = kvm_problem(secure_boot=opts.secure_boot)
    if problem is None:
        return "kvm"
    if opts.accel == "kvm":
        raise VMError(f"KVM does not work here: {problem} (use --accel auto or tcg)")
    _tell_fallback(problem, "booting")
    return "tcg"


def tpm_argv(socket: Path) -> list[str]:
    """QEMU's TPM2 (TIS interface) backed by the swtpm listening on `socket`."""
    return ["-chardev", f"socket,id=chrtpm,path={socket}",
            "-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
            "-device", "tpm-tis,tpmdev=tpm0"]


def swtpm_argv(state: Path, socket: Path) -> list[str]:
    """A TPM2 emulator keeping its state (keys, NV, PCR policy secrets) in `state`. No
    --terminate: a QEMU restarted under TCG connects to the same TPM again."""
    return [SWTPM, "socket", "--tpm2", "--tpmstate", f"dir={state}",
            "--ctrl", f"type=unixio,path={socket}"]


def qemu_argv(image: Path, opts: VMOptions, vars_path: Path,
              accel: Literal["kvm", "tcg"] | None = None,
              tpm_socket: Path | None = None) -> list[str]:
    """The QEMU command line of a boot (`accel` None: as choose_accel() decides;
    `tpm_socket` the swtpm of `opts.tpm`)."""
    code = firmware_code(secure_boot=opts.secure_boot)
    machine, secure = _machine(opts.secure_boot)
    argv = [
        QEMU, "-machine", machine, *_accel_args(accel or choose_accel(opts)),
        "-m", str(opts.memory_mib), "-nodefaults", "-display", "none", "-no-user-config",
        "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={code}",
        "-drive", f"if=pflash,format=raw,unit=1,file={vars_path}",
        "-drive", f"if=none,id=disk0,format=raw,file={image}"
        + (",snapshot=on" if opts.snapshot else ""),
        "-device", "virtio-blk-pci,drive=disk0,bootindex=1",
        "-device", "virtio-rng-pci",
        # Interactive: QEMU's monitor shares the terminal (Ctrl-a c); Ctrl-a x quits.
        *(["-serial", "mon:stdio"] if opts.interactive
          else ["-serial", "stdio", "-monitor", "none"]),
    ]
    for nic in opts.nic if opts.nic is not None else ["user,model=virtio-net-pci"]:
        argv += ["-nic", nic]
    if not opts.reboot:
        argv.append("-no-reboot")
    if tpm_socket is not None:
        argv += tpm_argv(tpm_socket)
    return argv + secure + opts.extra


class VM:
    """A running guest whose serial console can be searched (expect) and typed into (send).

    With accel "auto" a boot whose QEMU reports a KVM failure is killed and started again under
    TCG on the same disk and variables; expect() then searches the new boot's output only, so
    callers see one boot. The console keeps both (text(), the log)."""

    def __init__(self, image: Path, opts: VMOptions | None = None) -> None:
        self.image = Path(image)
        self.opts = opts or VMOptions()
        self.proc: subprocess.Popen[bytes] | None = None
        self.accel: Literal["kvm", "tcg"] | None = None  # what the running QEMU uses
        self.console = bytearray()
        self._cond = threading.Condition()
        self._pos = 0  # expect() searches from here: matches are consumed in order
        self._dead: str | None = None  # why the guest will print nothing more
        self._closing = False
        self._tmp = tempfile.TemporaryDirectory(prefix="particle-vm-")
        self._reader: threading.Thread | None = None
        self._log: IO[bytes] | None = None
        self._vars: Path | None = None
        self.swtpm: subprocess.Popen[bytes] | None = None
        self._tpm_socket: Path | None = None

    def _vars_path(self) -> Path:
        if self.opts.vars_file is not None:
            path = self.opts.vars_file
        elif self.opts.snapshot:
            path = Path(self._tmp.name) / "efivars.fd"
        else:
            path = self.image.with_name(self.image.name + ".efivars.fd")
        return path if path.exists() else new_vars(path)

    def start(self) -> VM:
        if not self.image.exists():
            raise ParticleError(f"{self.image}: no such image (run `particle build` first)")
        runner.require(QEMU)
        find_ovmf()
        self._vars = self._vars_path()
        self.accel = choose_accel(self.opts)
        if self.opts.tpm is not None:
            self._start_swtpm(self.opts.tpm)
        try:
            if self.opts.log:
                self._log = self.opts.log.open("ab")
            self.proc = self._spawn()
        except BaseException:
            self._stop_swtpm()  # __exit__ does not run when __enter__ fails
            raise
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _start_swtpm(self, state: Path) -> None:
        """Start the TPM2 emulator for this VM's life; its socket lives in our temporary
        directory, its state in `state` (kept: the same directory is the same TPM). In its own
        process group (runner.spawn): a Ctrl-C reaches QEMU, and the TPM is stopped after it."""
        state.mkdir(parents=True, exist_ok=True)
        socket = Path(self._tmp.name) / "swtpm.sock"
        errors = Path(self._tmp.name) / "swtpm.err"
        with errors.open("wb") as err:
            self.swtpm = runner.spawn(swtpm_argv(state, socket), stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=err.fileno())
        deadline = time.monotonic() + SWTPM_START_SECONDS
        while not socket.exists():
            status = self.swtpm.poll()
            if status is not None or time.monotonic() > deadline:
                text = errors.read_text(errors="replace").strip()
                self._stop_swtpm()
                why = (f"exited with status {status}" if status is not None
                       else f"made no socket within {SWTPM_START_SECONDS:.0f} s")
                raise VMError(f"swtpm (TPM state {state}) {why}" + (f": {text}" if text else ""))
            time.sleep(0.05)
        self._tpm_socket = socket

    def _stop_swtpm(self) -> None:
        if self.swtpm is not None:
            runner.stop(self.swtpm, grace=5.0)
            self.swtpm = None

    def _spawn(self) -> subprocess.Popen[bytes]:
        assert self._vars is not None and self.accel is not None
        argv = qemu_argv(self.image, self.opts, self._vars, self.accel, self._tpm_socket)
        ui.debug("$ " + " ".join(argv))
        if self.opts.interactive:
            # The terminal is the console; QEMU's own messages are watched on their way to it.
            return subprocess.Popen(argv, stderr=subprocess.PIPE)
        return subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )

    def _read(self) -> None:
        """Copy QEMU's output into the console until it ends; restart under TCG on a KVM
        failure (accel auto), otherwise record why the guest is dead."""
        while True:
            proc = self.proc
            assert proc is not None
            failure = self._pump(proc)
            if failure is None or self._closing:
                break
            if self.opts.accel != "auto" or self.accel != "kvm":
                with self._cond:
                    self._dead = f"KVM failed: {failure}"
                    self._cond.notify_all()
                self._stop(proc)  # a paused guest never resumes: do not leave QEMU behind
                break
            self._stop(proc)
            _tell_fallback(failure, "restarting")
            with self._cond:
                if self._closing:
                    break
                self.accel = "tcg"
                self._pos = len(self.console)  # a new boot: expect() starts over
                try:
                    self.proc = self._spawn()
                except OSError as err:
                    self._dead = f"QEMU did not start again under TCG ({err})"
                    break
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def _pump(self, proc: subprocess.Popen[bytes]) -> str | None:
        """Read one QEMU's output to its end; returns the KVM failure it reported, if any."""
        stream = proc.stderr if self.opts.interactive else proc.stdout
        assert stream is not None
        fd = stream.fileno()
        recent = b""  # the end of this process's output: a message split across reads
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            recent = recent[-256:] + chunk
            if self.opts.interactive:
                sys.stderr.buffer.write(chunk)
                sys.stderr.buffer.flush()
            else:
                if self.opts.echo:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.buffer.flush()
                if self._log:
                    self._log.write(chunk)
                    self._log.flush()
                with self._cond:
                    start = max(self._pos, len(self.console) - 256)
                    self.console.extend(chunk)
                    m = NO_BOOT.search(self.console, start)
                    if m and self._dead is None:
                        self._dead = ("the firmware found nothing to boot ("
                                      f"{_line(m.group(0))})")
                    self._cond.notify_all()
            failure = KVM_FAILURE.search(recent) if self.accel == "kvm" else None
            if failure:
                return _line(failure.group(0))

    def _stop(self, proc: subprocess.Popen[bytes]) -> None:
        """End one QEMU; SIGTERM first when it owns the terminal, so it restores the tty."""
        if proc.poll() is None:
            if self.opts.interactive:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(5)
                    return
                except subprocess.TimeoutExpired:
                    pass
            proc.kill()
        proc.wait()

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _exit_status(self) -> str:
        """How QEMU ended, once its output has ended (it exits right after closing it)."""
        if self.proc is None:
            return "QEMU did not start"
        try:
            return f"QEMU exited with status {self.proc.wait(5)}"
        except subprocess.TimeoutExpired:
            return "QEMU closed its output"

    def expect(self, pattern: str | re.Pattern[bytes], timeout: float) -> re.Match[bytes]:
        """Wait for `pattern` on the console after the previous match; VMError on timeout, and
        at once when the guest is known dead (QEMU exited or paused it, no boot device)."""
        rx = re.compile(pattern.encode()) if isinstance(pattern, str) else pattern
        shown = repr(rx.pattern.decode(errors="replace"))
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                m = rx.search(self.console, self._pos)
                if m:
                    self._pos = m.end()
                    return m
                if self._dead or not (self._reader is not None and self._reader.is_alive()):
                    why = self._dead or self._exit_status()
                    raise VMError(f"{why}; {shown} did not appear"
                                  + self.tail())
                left = deadline - time.monotonic()
                if left <= 0:
                    raise VMError(f"timed out after {timeout:.0f} s waiting for {shown}"
                                  + self.tail())
                self._cond.wait(min(left, 1.0))

    def send(self, text: str) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def text(self) -> str:
        with self._cond:
            return self.console.decode(errors="replace")

    def tail(self, lines: int = 25) -> str:
        return console_tail(self.text(), lines)

    def wait(self, timeout: float | None = None) -> int:
        """Wait for QEMU to exit (the guest powered off); its exit status. A restart under
        TCG is waited for too: the status is the last QEMU's."""
        assert self.proc is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            proc = self.proc
            try:
                status = proc.wait(None if deadline is None
                                   else max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired as err:
                raise VMError(f"the machine did not power off within {timeout} s"
                              + self.tail()) from err
            with self._cond:  # the reader either restarts (a new proc) or finishes
                while self.proc is proc and self._reader is not None \
                        and self._reader.is_alive():
                    self._cond.wait(1.0)
            if self.proc is proc:
                if self._dead and self._dead.startswith("KVM failed"):
                    raise VMError(self._dead + self.tail())
                return status

    def kill(self) -> None:
        self._closing = True
        with self._cond:
            proc = self.proc
        if proc is not None:
            self._stop(proc)
        if self._reader is not None:
            self._reader.join(timeout=10)
        if self.proc is not None and self.proc is not proc:  # a restart raced with us
            self._stop(self.proc)
        self._stop_swtpm()  # after QEMU: the guest's TPM goes with the machine
        if self._log:
            self._log.close()
            self._log = None

    def close(self) -> None:
        self.kill()
        self._tmp.cleanup()

    def __enter__(self) -> VM:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")


def _clean(text: str) -> str:
    return _ANSI.sub("", text)


def console_tail(text: str, lines: int = 25) -> str:
    """The last lines of a console (a VM's or a container's), without terminal escapes, to
    end an error message with."""
    body = "\n".join("    " + ln for ln in _clean(text).strip().splitlines()[-lines:])
    return f"\n  last console lines:\n{body}" if body else ""


def boot(image: Path, *, snapshot: bool, timeout: float, expect: str | None,
         memory_mib: int = 2048, vars_file: Path | None = None,
         secure_boot: bool = False, accel: Accel = "auto", tpm: Path | None = None) -> int:
    """`particle qemu`: interactive console, or with `expect` a pass/fail check that fails
    as soon as the guest is known dead rather than at `timeout`."""
    opts = VMOptions(snapshot=snapshot, memory_mib=memory_mib, vars_file=vars_file,
                     secure_boot=secure_boot, accel=accel, tpm=tpm)
    if expect is None:
        opts.interactive = True
        with VM(image, opts) as vm:
            return vm.wait()
    opts.echo = True
    with VM(image, opts) as vm:
        start = time.monotonic()
        vm.expect(expect, timeout)
        ui.info(f"\nparticle qemu: found {expect!r} after {time.monotonic() - start:.0f} s")
        return 0
