"""`particle diff`: package changes between two builds from their manifests, with Debian's
version order (checked against dpkg itself)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from particleos.formats import Manifest
from particleos.machine.changes import compare, debian_vercmp

VERSIONS = [
    ("1.0", "1.0-1"), ("1.0~rc1", "1.0"), ("1:0.9", "2.0"), ("2.36.1-8+deb12u1", "2.36.1-8"),
    ("257.9-1~deb13u1", "257.9-1"), ("1.0a", "1.0"), ("1.0", "1.0.1"),
    ("6.12.117-1", "6.12.57-1"), ("1.2-3", "1.2-3"), ("0.0~git2020", "0.0"),
    ("1.0+b1", "1.0"), ("1.10", "1.9"), ("2:1.0-1", "1:9.9-9"), ("1.0-1ubuntu1", "1.0-1"),
    ("3.2.5-1+b2", "3.2.5-1+b10"),
]


@pytest.mark.skipif(shutil.which("dpkg") is None, reason="dpkg is the reference")
@pytest.mark.parametrize(("a", "b"), VERSIONS)
def test_debian_version_order_matches_dpkg(a: str, b: str) -> None:
    def dpkg(op: str) -> bool:
        return subprocess.run(["dpkg", "--compare-versions", a, op, b]).returncode == 0

    want = 0 if dpkg("eq") else -1 if dpkg("lt") else 1
    assert debian_vercmp(a, b) == want
    assert debian_vercmp(b, a) == -want


def manifest(version: str, packages: dict[str, str], kernel: str = "6.12.1") -> Manifest:
    return Manifest(
        id="demo", version=version, release="trixie", architecture="x86-64", kernel=kernel,
        usr_filesystem="erofs", root_hash="ab" * 32, packages=packages,
        sizes={f"demo_{version}.usr.raw": 100 << 20, f"demo_{version}.usr-verity.raw": 1 << 20,
               f"demo_{version}.efi": 30 << 20, f"demo_{version}.raw": 3 << 30,
               f"demo_{version}.manifest.json": 5000},
    )


OLD = manifest("1", {"bash": "5.2-1", "htop": "3.3-1", "less": "590-2", "zlib1g": "1:1.3-2"})
NEW = manifest("2", {"bash": "5.2-2", "less": "590-2", "zlib1g": "1:1.2-9", "vim": "9.1-1"},
               kernel="6.12.2")


def test_compare_classifies_every_change() -> None:
    c = compare(OLD, NEW)
    assert c.added == {"vim": "9.1-1"}
    assert c.removed == {"htop": "3.3-1"}
    assert c.upgraded == {"bash": ("5.2-1", "5.2-2")}
    assert c.downgraded == {"zlib1g": ("1:1.3-2", "1:1.2-9")}
    assert c.kernel == ("6.12.1", "6.12.2")
    assert c.download_bytes == (100 << 20) + (1 << 20) + (30 << 20)  # not the disk image
    assert not c.empty
    assert compare(OLD, OLD).empty


def particle(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "particleos", *args], capture_output=True,
                          text=True, check=False)


def test_particle_diff_of_two_build_directories(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for d, m in ((a, OLD), (b, NEW)):
        d.mkdir()
        (d / m.name).write_text(m.to_json())
    older = manifest("0.9", {"bash": "5.1-1"})  # in a's directory too: the newest one counts
    (a / older.name).write_text(older.to_json())
    proc = particle("diff", str(a), str(b))
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "1 -> 2" in text and "kernel: 6.12.1 -> 6.12.2" in text
    assert "added (1):\n  vim 9.1-1" in text and "removed (1):\n  htop 3.3-1" in text
    assert "upgraded (1):\n  bash 5.2-1 -> 5.2-2" in text
    assert "downgraded (1):\n  zlib1g 1:1.3-2 -> 1:1.2-9" in text
    assert "full update download: 131.0 MiB" in text
    proc = particle("diff", "--json", str(a / OLD.name), str(b / NEW.name))
    assert json.loads(proc.stdout)["upgraded"] == {"bash": ["5.2-1", "5.2-2"]}


def test_particle_diff_names_what_is_not_a_build(tmp_path: Path) -> None:
    (tmp_path / "x.manifest.json").write_text("{not json")
    proc = particle("diff", str(tmp_path / "x.manifest.json"), str(tmp_path))
    assert proc.returncode == 1 and "not a build manifest" in proc.stderr
    assert "Traceback" not in proc.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = particle("diff", str(empty), str(empty))
    assert proc.returncode == 1 and "no build here" in proc.stderr
