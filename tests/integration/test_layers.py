"""The layered tree cache: adding a package is installed with apt on the cached base, and gives
the same packages at the same versions as installing everything in one go would; a layered
build is reproducible; `particle build` says how the tree was made."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from particleos.builder import BuildResult, build
from particleos.builder.bootstrap import package_list
from particleos.cache import cache_root, remove_tree
from particleos.formats import Manifest
from particleos.spec import Spec, load_spec

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parents[2] / "examples/minimal"
S1 = ["less", "sudo", "tree"]  # the example plus one package
S2 = [*S1, "htop"]  # ... plus one more


def spec_with(packages: list[str], version: str) -> Spec:
    return load_spec(EXAMPLE, overrides=[f"system.version={version}",
                                         f"packages.install={json.dumps(packages)}"])


def manifest(result: BuildResult) -> Manifest:
    return Manifest.from_json(
        (result.output_dir / f"{result.id}_{result.version}.manifest.json").read_text())


def one_shot(spec: Spec) -> dict[str, str]:
    """What a single bootstrap of every package of the spec installs (name -> version): apt's
    own resolution, as mmdebstrap --simulate runs it from an empty root."""
    s = spec.system
    proc = subprocess.run(
        ["mmdebstrap", "--verbose", "--simulate", "--mode=root", "--variant=apt",
         "--architectures=amd64", "--include=" + ",".join(package_list(spec)),
         s.release, "/dev/null", s.mirror],
        capture_output=True, text=True, check=True,
    )
    found = re.findall(r"^Inst (\S+) \((\S+) ", proc.stdout + proc.stderr, re.MULTILINE)
    return dict(found)


@pytest.fixture
def private_trees(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache of our own for trees and initrds (so the layered path is what runs, whatever
    other builds cached), sharing the base, tools and apt archives with every other build."""
    shared = cache_root()
    private = tmp_path / "cache"
    private.mkdir()
    for part in ("bases", "tools", "apt-archives"):
        (shared / part).mkdir(parents=True, exist_ok=True)
        (private / part).symlink_to(shared / part)
    monkeypatch.setenv("PARTICLE_CACHE_DIR", str(private))
    return private


def test_one_package_is_layered_like_a_cold_build(private_trees: Path, tmp_path: Path) -> None:
    s1 = build(spec_with(S1, "1"), tmp_path / "s1")
    assert s1.tree_path.startswith(("layered on a cached base (3 packages",
                                    "cold (base bootstrapped, 3 packages"))
    s2_spec = spec_with(S2, "1")
    s2 = build(s2_spec, tmp_path / "s2")
    assert s2.tree_path.startswith("layered on a cached base (4 packages with apt)")
    assert not s2.cache_hit
    assert manifest(s2).tree_path == s2.tree_path

    packages = manifest(s2).packages
    assert "htop" in packages and "htop" not in manifest(s1).packages
    expected = one_shot(s2_spec)
    assert packages == expected, (
        f"only layered: {sorted(set(packages.items()) - set(expected.items()))}; "
        f"only one-shot: {sorted(set(expected.items()) - set(packages.items()))}"
    )

    # Reproducible within the layered path: the tree made again from the base gives the same
    # /usr, byte for byte.
    remove_tree(private_trees / "trees")
    remove_tree(private_trees / "initrds")
    again = build(spec_with(S2, "1"), tmp_path / "s2-again")
    assert again.tree_path == s2.tree_path
    name = "particle-minimal_1"
    for suffix in (".usr.raw", ".efi"):
        first = hashlib.sha256((s2.output_dir / f"{name}{suffix}").read_bytes()).hexdigest()
        second = hashlib.sha256((again.output_dir / f"{name}{suffix}").read_bytes()).hexdigest()
        assert first == second, f"{suffix} differs between two layered builds of one spec"

    # Unchanged: the whole tree comes from the cache, and `particle build` says so.
    out = tmp_path / "cli"
    cli = subprocess.run(
        [sys.executable, "-m", "particleos", "build", str(EXAMPLE), "-o", str(out),
         "--set", "system.version=2", "--set", f"packages.install={json.dumps(S2)}"],
        capture_output=True, text=True, env=os.environ.copy(),
    )
    assert cli.returncode == 0, cli.stderr
    assert "bootstrap:  tree cache hit" in cli.stdout
    m = Manifest.from_json((out / "particle-minimal_2.manifest.json").read_text())
    assert m.tree_path == "tree cache hit"
    assert m.packages == packages
