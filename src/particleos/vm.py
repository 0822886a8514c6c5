"""Boot images in QEMU with UEFI firmware and a serial console: for people (`particle qemu`)
and for tests, which drive the console with expect()/send(). KVM is used when it works, TCG
otherwise, with CPU flags that keep TCG guests stable (DESIGN.md section 7)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from . import runner
from .errors import ParticleError
from .ui import ui

OVMF_DIRS = (Path("/usr/share/OVMF"), Path("/usr/share/ovmf"))
OVMF_PAIRS = (("OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd"), ("OVMF_CODE.fd", "OVMF_VARS.fd"))
_kvm_ok: bool | None = None


class VMError(ParticleError):
    """The guest did not do what was expected (timeout, power-off); carries the console tail."""


def find_ovmf() -> tuple[Path, Path]:
    for d in OVMF_DIRS:
        for code, vars_ in OVMF_PAIRS:
            if (d / code).exists() and (d / vars_).exists():
                return d / code, d / vars_
    raise ParticleError("UEFI firmware (OVMF) not found; install it with: apt-get install ovmf")


def kvm_works() -> bool:
    """Probe once whether QEMU can really use KVM here (a /dev/kvm node is not enough)."""
    global _kvm_ok
    forced = os.environ.get("PARTICLE_ACCEL")
    if forced in ("kvm", "tcg"):
        return forced == "kvm"
    if _kvm_ok is None:
        _kvm_ok = False
        if os.access("/dev/kvm", os.R_OK | os.W_OK):
            try:
                proc = subprocess.run(
                    # A real vCPU with -cpu host: "-machine none" passes on hosts where
                    # setting up the vCPU's MSRs then fails.
                    ["qemu-system-x86_64", "-machine", "q35", "-accel", "kvm", "-cpu", "host",
                     "-display", "none", "-nodefaults", "-monitor", "stdio", "-S"],
                    input=b"quit\n", capture_output=True, timeout=20, check=False,
                )
                _kvm_ok = proc.returncode == 0 and b"failed" not in proc.stderr.lower()
            except (OSError, subprocess.TimeoutExpired):
                _kvm_ok = False
        ui.debug(f"KVM usable: {_kvm_ok}")
    return _kvm_ok


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


def qemu_argv(image: Path, opts: VMOptions, vars_path: Path) -> list[str]:
    code, _ = find_ovmf()
    machine, secure = "q35", []
    if opts.secure_boot:  # only SMM code may write the (authenticated) variables
        from .secureboot import secboot_code

        code, machine = secboot_code(code), "q35,smm=on"
        secure = ["-global", "driver=cfi.pflash01,property=secure,value=on"]
    if kvm_works():
        accel = ["-accel", "kvm", "-cpu", "host", "-smp", "2"]
    else:
        # TCG: cmpxchg16b in the guest corrupts memory under QEMU 7.2's TCG; one vCPU.
        accel = ["-accel", "tcg", "-cpu", "qemu64,-cx16", "-smp", "1"]
    argv = [
        "qemu-system-x86_64", "-machine", machine, *accel, "-m", str(opts.memory_mib),
        "-nodefaults", "-display", "none", "-no-user-config",
        "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={code}",
        "-drive", f"if=pflash,format=raw,unit=1,file={vars_path}",
        "-drive", f"if=none,id=disk0,format=raw,file={image}"
        + (",snapshot=on" if opts.snapshot else ""),
        "-device", "virtio-blk-pci,drive=disk0,bootindex=1",
        "-device", "virtio-rng-pci",
        "-serial", "mon:stdio" if opts.interactive else "stdio",
        "-monitor", "none",
    ]
    if opts.interactive:
        argv.remove("-monitor")
        argv.remove("none")
    for nic in opts.nic if opts.nic is not None else ["user,model=virtio-net-pci"]:
        argv += ["-nic", nic]
    if not opts.reboot:
        argv.append("-no-reboot")
    return argv + secure + opts.extra


class VM:
    """A running guest whose serial console can be searched (expect) and typed into (send)."""

    def __init__(self, image: Path, opts: VMOptions | None = None) -> None:
        self.image = Path(image)
        self.opts = opts or VMOptions()
        self.proc: subprocess.Popen[bytes] | None = None
        self.console = bytearray()
        self._cond = threading.Condition()
        self._pos = 0  # expect() searches from here: matches are consumed in order
        self._tmp = tempfile.TemporaryDirectory(prefix="particle-vm-")
        self._reader: threading.Thread | None = None
        self._log: IO[bytes] | None = None

    def _vars_path(self) -> Path:
        _, template = find_ovmf()
        if self.opts.vars_file is not None:
            path = self.opts.vars_file
        elif self.opts.snapshot:
            path = Path(self._tmp.name) / "efivars.fd"
        else:
            path = self.image.with_name(self.image.name + ".efivars.fd")
        if not path.exists():
            shutil.copyfile(template, path)
        return path

    def start(self) -> VM:
        if not self.image.exists():
            raise ParticleError(f"{self.image}: no such image (run `particle build` first)")
        argv = qemu_argv(self.image, self.opts, self._vars_path())
        runner.require(argv[0])
        ui.debug("$ " + " ".join(argv))
        if self.opts.log:
            self._log = self.opts.log.open("ab")
        if self.opts.interactive:
            self.proc = subprocess.Popen(argv)
            return self
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            if self.opts.echo:
                sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()
            if self._log:
                self._log.write(chunk)
                self._log.flush()
            with self._cond:
                self.console.extend(chunk)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def expect(self, pattern: str | re.Pattern[bytes], timeout: float) -> re.Match[bytes]:
        """Wait for `pattern` on the console after the previous match; VMError on timeout or
        when QEMU exits first."""
        rx = re.compile(pattern.encode()) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                m = rx.search(self.console, self._pos)
                if m:
                    self._pos = m.end()
                    return m
                if not self.running() and (self._reader is None or not self._reader.is_alive()):
                    raise VMError(f"the machine stopped before {rx.pattern!r} appeared"
                                  + self.tail())
                left = deadline - time.monotonic()
                if left <= 0:
                    raise VMError(f"timed out after {timeout:.0f} s waiting for "
                                  f"{rx.pattern!r}" + self.tail())
                self._cond.wait(min(left, 1.0))

    def send(self, text: str) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def text(self) -> str:
        with self._cond:
            return self.console.decode(errors="replace")

    def tail(self, lines: int = 25) -> str:
        body = "\n".join("    " + ln for ln in _clean(self.text()).splitlines()[-lines:])
        return f"\n  last console lines:\n{body}" if body else ""

    def wait(self, timeout: float | None = None) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired as err:
            raise VMError(f"the machine did not power off within {timeout} s" + self.tail()) \
                from err

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=5)
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


def boot(image: Path, *, snapshot: bool, timeout: float, expect: str | None,
         memory_mib: int = 2048, vars_file: Path | None = None,
         secure_boot: bool = False) -> int:
    """`particle qemu`: interactive console, or with `expect` a pass/fail check."""
    if expect is None:
        vm = VM(image, VMOptions(snapshot=snapshot, interactive=True, memory_mib=memory_mib,
                                 vars_file=vars_file, secure_boot=secure_boot))
        vm.start()
        assert vm.proc is not None
        try:
            return vm.proc.wait()
        finally:
            vm.close()
    with VM(image, VMOptions(snapshot=snapshot, echo=True, memory_mib=memory_mib,
                             vars_file=vars_file, secure_boot=secure_boot)) as vm:
        start = time.monotonic()
        vm.expect(expect, timeout)
        ui.info(f"\nparticle qemu: found {expect!r} after {time.monotonic() - start:.0f} s")
        return 0
