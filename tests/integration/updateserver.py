"""A static HTTP server on the host's loopback for update tests, which can hold a download
at a chosen byte so that a test can power the guest off at an exact point of an update."""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO


@dataclass
class Hold:
    """Stop sending a file whose name ends with `suffix` after `after` bytes, until released."""

    suffix: str
    after: int
    reached: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)


class _Handler(http.server.SimpleHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        self.server.log.append(format % args)

    def copyfile(self, source: BinaryIO, outputfile: BinaryIO) -> None:  # type: ignore[override]
        name = self.path.rsplit("/", 1)[-1]
        hold = next((h for h in self.server.holds if name.endswith(h.suffix)), None)
        sent = 0
        while chunk := source.read(1 << 16):
            if hold is not None and sent + len(chunk) > hold.after:
                head = hold.after - sent
                outputfile.write(chunk[:head])
                outputfile.flush()
                self.server.count(name, head)
                hold.reached.set()
                hold.release.wait(600)
                return  # the client is gone by now: drop the connection
            outputfile.write(chunk)
            sent += len(chunk)
            self.server.count(name, len(chunk))


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, directory: Path) -> None:
        super().__init__(("127.0.0.1", 0), partial(_Handler, directory=str(directory)))
        self.holds: list[Hold] = []
        self.log: list[str] = []
        self.sent: dict[str, int] = {}
        self._lock = threading.Lock()

    def count(self, name: str, n: int) -> None:
        with self._lock:
            self.sent[name] = self.sent.get(name, 0) + n


class UpdateServer:
    """`with UpdateServer(dir) as srv:` serves `dir` on 127.0.0.1:srv.port."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._server = _Server(directory)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def sent(self) -> dict[str, int]:
        return dict(self._server.sent)

    @property
    def log(self) -> list[str]:
        return list(self._server.log)

    def hold(self, suffix: str, after: int) -> Hold:
        h = Hold(suffix, after)
        self._server.holds.append(h)
        return h

    def release_all(self) -> None:
        for h in self._server.holds:
            h.release.set()
        self._server.holds.clear()

    def reset_counts(self) -> None:
        self._server.sent.clear()

    def __enter__(self) -> UpdateServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release_all()
        self._server.shutdown()
        self._server.server_close()


@contextlib.contextmanager
def serving(directory: Path) -> Iterator[UpdateServer]:
    with UpdateServer(directory) as srv:
        yield srv
