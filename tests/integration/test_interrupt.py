"""A real `particle build` killed with SIGTERM while mmdebstrap installs packages (from the real
mirror, into an empty cache) leaves no work directory, no half tree and no mount behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from particleos.cache import mounts_below

pytestmark = pytest.mark.slow


def descendants(pid: int) -> dict[int, str]:
    """Every process below `pid`, with its command name."""
    parents: dict[int, tuple[int, str]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        parents[int(stat.parent.name)] = (int(text.rsplit(")", 1)[1].split()[1]), name)
    found: dict[int, str] = {}
    frontier = {pid}
    while frontier:
        frontier = {p for p, (pp, _) in parents.items() if pp in frontier and p not in found}
        found.update({p: parents[p][1] for p in frontier})
    return found


def test_sigterm_during_bootstrap_leaves_nothing(tmp_path: Path) -> None:
    (tmp_path / "sys").mkdir()
    (tmp_path / "sys/particle.toml").write_text('[system]\nid = "demo"\n')
    cache = tmp_path / "cache"
    proc = subprocess.Popen(
        [sys.executable, "-m", "particleos", "build"], cwd=tmp_path / "sys",
        env={**os.environ, "PARTICLE_CACHE_DIR": str(cache)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    # Mid-bootstrap: mmdebstrap has started dpkg inside the new tree.
    while not {"mmdebstrap", "dpkg"} <= set(descendants(proc.pid).values()):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    tmp_trees = list(cache.glob("*/.*.tmp-*"))  # (not rglob: the tree has /proc mounted)
    assert tmp_trees  # the half tree exists before the signal
    children = descendants(proc.pid)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate()
    assert proc.returncode == 143, err
    assert err.splitlines()[-1] == "interrupted" and "Traceback" not in err
    assert not [p for p in children if Path(f"/proc/{p}").exists()
                and Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
    assert mounts_below(cache) == []
    assert list((cache / "work").iterdir()) == []
    assert list(cache.glob("*/.*")) == []  # no atomic_dir temporary, no lock
