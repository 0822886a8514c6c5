"""Typing commands into a guest's serial console (a root shell that the test image's getty
starts) and reading back their output and exit status between unique markers."""

from __future__ import annotations

import itertools
import json
import re
import time
from typing import Any

from particleos.vm import VM

PROMPT = r"root@[\w-]+:[^\r\n]*# "
_ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")
_ids = itertools.count(1)


class GuestShell:
    def __init__(self, vm: VM) -> None:
        self.vm = vm

    def login(self, timeout: float = 600) -> float:
        """Wait for the autologin shell of a (new) boot, make it quiet and wait until start-up
        has finished; returns the time when the shell appeared."""
        self.vm.expect(r"\(automatic login\)", timeout)
        self.vm.expect(PROMPT, 60)
        seen = time.monotonic()
        # No kernel messages, no echo, no bracketed paste: the console carries only output.
        self.vm.send("dmesg -n 1; stty -echo; bind 'set enable-bracketed-paste off'; "
                     "export SYSTEMD_COLORS=0 SYSTEMD_PAGER= PAGER=cat\r")
        self.run("systemctl is-system-running --wait", timeout=300, check=False)
        return seen

    def run(self, cmd: str, timeout: float = 120, check: bool = True) -> tuple[int, str]:
        """Run `cmd`; returns (exit status, output). The markers are computed by the shell
        ($((6*7))), so the typed command line itself never matches them."""
        n = next(_ids)
        self.vm.send(f"echo PARTICLE-BEGIN-{n}-$((6*7)); {cmd}; "
                     f"echo PARTICLE-RC-{n}-$((6*7))=$?\r")
        rx = re.compile(rf"PARTICLE-BEGIN-{n}-42\r?\n(.*?)PARTICLE-RC-{n}-42=(\d+)".encode(),
                        re.DOTALL)
        m = self.vm.expect(rx, timeout)
        out = _ANSI.sub(b"", m.group(1)).decode(errors="replace").replace("\r", "")
        rc = int(m.group(2))
        if check and rc != 0:
            raise AssertionError(f"`{cmd}` failed with exit status {rc}:\n{out}")
        return rc, out

    def out(self, cmd: str, timeout: float = 120) -> str:
        return self.run(cmd, timeout)[1].strip()

    def json(self, cmd: str, timeout: float = 120) -> Any:
        return json.loads(self.out(cmd, timeout))

    def start(self, cmd: str) -> None:
        """Type a command without waiting for it (reboots, or updates a test interrupts)."""
        self.vm.send(f"{cmd}\r")
