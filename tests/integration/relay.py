"""`python relay.py PORT`: copy stdin/stdout to and from 127.0.0.1:PORT (a test helper).

QEMU user networking runs this once per guest connection for a rule such as
`guestfwd=tcp:10.0.2.100:80-cmd:python relay.py 8080`: with `restrict=on` the guest
reaches nothing but this relay, and the relay reaches nothing but the host's loopback. A plain
`tcp:` guestfwd target would serve only the first connection of the whole QEMU run."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
from pathlib import Path

CHUNK = 1 << 16
GUEST_ADDR = "10.0.2.100"  # where the guest finds the host's server


def relay(port: int, infd: int = 0, outfd: int = 1) -> None:
    sock = socket.create_connection(("127.0.0.1", port))

    def upstream() -> None:
        """Guest -> server; on EOF half-close so the server sees the end of the request."""
        try:
            while data := os.read(infd, CHUNK):
                sock.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)

    thread = threading.Thread(target=upstream, daemon=True)
    thread.start()
    try:
        while data := sock.recv(CHUNK):
            view = memoryview(data)
            while view:
                view = view[os.write(outfd, view) :]
    except OSError:
        pass
    finally:
        sock.close()
        with contextlib.suppress(OSError):
            os.close(outfd)


def user_nic(port: int, guest_addr: str = GUEST_ADDR, guest_port: int = 80) -> str:
    """A `-nic` value: restricted user networking whose only way out is this relay to
    127.0.0.1:PORT, reached from the guest as http://GUEST_ADDR:GUEST_PORT/."""
    cmd = f"{sys.executable} {Path(__file__).resolve()} {port}"
    if "," in cmd:
        cmd = cmd.replace(",", ",,")  # QEMU option syntax: a literal comma is doubled
    return (f"user,model=virtio-net-pci,restrict=on,"
            f"guestfwd=tcp:{guest_addr}:{guest_port}-cmd:{cmd}")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].isdigit():
        print("usage: python relay.py PORT", file=sys.stderr)
        return 2
    try:
        relay(int(args[0]))
    except OSError as err:
        print(f"particleos.relay: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
