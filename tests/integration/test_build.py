"""Builder properties a user relies on: reproducible /usr, cache hits, and failed builds that
leave the previous outputs untouched."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from particleos.builder import build
from particleos.errors import CommandError
from particleos.spec import load_spec

from .conftest import SPECS, BuildFn

pytestmark = pytest.mark.slow


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_rebuild_is_reproducible_and_cached(build_image: BuildFn, tmp_path: Path) -> None:
    first = build_image("bootcheck", "1.0.0")
    second = build_image("bootcheck", "1.0.0", output=tmp_path / "again")
    assert second.cache_hit
    name = "particle-minimal_1.0.0"
    for suffix in (".usr.raw", ".usr-verity.raw", ".efi", ".raw"):
        assert digest(first.output_dir / f"{name}{suffix}") == digest(
            second.output_dir / f"{name}{suffix}"
        ), f"{suffix} differs between two builds of the same spec and version"
    assert first.root_hash == second.root_hash


def test_failed_build_leaves_outputs_intact(build_image: BuildFn) -> None:
    good = build_image("bootcheck", "1.0.0")
    out = good.output_dir
    before = {p.name: digest(p) for p in out.iterdir() if p.is_file() and p.suffix != ".raw"}
    spec = load_spec(
        SPECS / "bootcheck",
        overrides=["system.version=1.0.1", 'packages.install=["no-such-package-particleos"]'],
    )
    with pytest.raises(CommandError) as err:
        build(spec, out)
    assert "apt-get install" in str(err.value)
    assert "no-such-package-particleos" in str(err.value)
    after = {p.name: digest(p) for p in out.iterdir() if p.is_file() and p.suffix != ".raw"}
    assert after == before
    assert not [p for p in out.iterdir() if "1.0.1" in p.name or p.name.startswith(".")]
