"""How the tree's layers are split and keyed, without a mirror: the base notices a new package
version on the mirror (and only that), the spec's packages go on top of it."""

from __future__ import annotations

import http.server
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from particleos.builder.bootstrap import (
    DEFAULT_KERNEL,
    _ensure_base,
    base_key,
    base_packages,
    extra_packages,
    mirror_state,
    package_list,
    release_state,
)
from particleos.builder.context import BuildContext
from particleos.spec import load_spec
from particleos.tools import ToolsTree

EXAMPLE = Path(__file__).resolve().parents[2] / "examples/minimal"

RELEASE = """\
Origin: Debian
Suite: stable
Date: {date}
MD5Sum:
 0123 100 main/binary-amd64/Packages
SHA256:
 {amd64} 56634892 main/binary-amd64/Packages
 bbbb 9679304 main/binary-amd64/Packages.xz
 {arm64} 56000000 main/binary-arm64/Packages
 cccc 24089534 main/binary-all/Packages
 dddd 100 main/i18n/Translation-en
"""


def release(date: str = "Sat, 21 Nov 2026 09:15:44 UTC", amd64: str = "aaaa",
            arm64: str = "eeee") -> str:
    return RELEASE.format(date=date, amd64=amd64, arm64=arm64)


def test_state_follows_the_architectures_packages_only() -> None:
    first = release_state(release(), "amd64")
    assert release_state(release(date="Sun, 22 Nov 2026 09:15:44 UTC"), "amd64") == first
    assert release_state(release(arm64="ffff"), "amd64") == first
    assert release_state(release(amd64="abab"), "amd64") != first
    assert release_state(release(amd64="abab"), "arm64") == release_state(release(), "arm64")


def test_packages_split_into_base_and_spec_layers() -> None:
    spec = load_spec(EXAMPLE, overrides=['packages.install=["less", "systemd", "htop"]'])
    assert DEFAULT_KERNEL in base_packages(spec) and "systemd" in base_packages(spec)
    assert extra_packages(spec) == ["less", "htop"]  # systemd is in the base already
    assert package_list(spec) == [*base_packages(spec), "less", "htop"]
    own = load_spec(EXAMPLE, overrides=['packages.install=["linux-image-amd64", "htop"]'])
    assert "linux-image-amd64" in base_packages(own)
    assert DEFAULT_KERNEL not in base_packages(own)
    assert extra_packages(own) == ["htop"]


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[str]:
    (tmp_path / "dists/trixie").mkdir(parents=True)
    (tmp_path / "dists/trixie/InRelease").write_text(release())

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kw: object) -> None:
            super().__init__(*args, directory=str(tmp_path), **kw)  # type: ignore[arg-type]

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def test_mirror_state_is_read_from_inrelease(mirror: str) -> None:
    assert mirror_state(mirror, "trixie", "amd64") == release_state(release(), "amd64")
    assert mirror_state(mirror, "no-such-release", "amd64") is None
    assert mirror_state("http://127.0.0.1:9/", "trixie", "amd64") is None


def test_unreachable_mirror_reuses_the_newest_cached_base(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PARTICLE_CACHE_DIR", str(tmp_path / "cache"))
    spec = load_spec(EXAMPLE, overrides=["system.mirror=http://127.0.0.1:9/debian"])
    bases = tmp_path / "cache/bases"
    for n, state in enumerate(("old", "new")):
        (bases / f"trixie-{base_key(spec)}-{state}/root/usr").mkdir(parents=True)
        os.utime(bases / f"trixie-{base_key(spec)}-{state}", (1000 + n, 1000 + n))
    (bases / "trixie-0000000000000000-newest/root/usr").mkdir(parents=True)  # another base
    ctx = BuildContext(spec=spec, version="1", output_dir=tmp_path / "out",
                       work_dir=tmp_path / "work", tools=ToolsTree())
    base, note = _ensure_base(ctx)
    assert (base.name, note) == (f"trixie-{base_key(spec)}-new", "offline")
