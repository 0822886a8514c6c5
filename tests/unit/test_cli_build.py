"""CLI verbs around builds that need no mirror: clean, missing images, missing tools."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from particleos import runner
from particleos.errors import CommandError, MissingToolError


def particle(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None
             ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "particleos", *args], capture_output=True, text=True,
        check=False, env={**os.environ, **(env or {})}, cwd=cwd,
    )


def test_clean_removes_outputs_and_caches(tmp_path: Path) -> None:
    spec_dir = tmp_path / "sys"
    (spec_dir / "out").mkdir(parents=True)
    (spec_dir / "out" / "x_1.raw").write_bytes(b"x")
    (spec_dir / "particle.toml").write_text('[system]\nid = "x"\n')
    cache = tmp_path / "cache"
    (cache / "trees" / "t").mkdir(parents=True)
    proc = particle("clean", str(spec_dir), "--all", env={"PARTICLE_CACHE_DIR": str(cache)})
    assert proc.returncode == 0, proc.stderr
    assert not (spec_dir / "out").exists()
    assert not cache.exists()
    assert (spec_dir / "particle.toml").exists()


def test_qemu_without_image_is_a_clear_error(tmp_path: Path) -> None:
    proc = particle("qemu", str(tmp_path / "nothing.raw"))
    assert proc.returncode == 1
    assert "no such image" in proc.stderr and "particle build" in proc.stderr
    assert "Traceback" not in proc.stderr
    (tmp_path / "out").mkdir()
    proc = particle("qemu", cwd=tmp_path)
    assert proc.returncode == 1 and "no disk image" in proc.stderr


def test_runner_explains_failures_and_missing_tools(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(CommandError) as err:
        runner.run(["sh", "-c", "echo first >&2; echo the-real-reason >&2; exit 3"],
                   what="a step")
    msg = str(err.value)
    assert "a step failed (exit status 3)" in msg
    assert "the-real-reason" in msg and "sh -c" in msg
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(MissingToolError, match="apt-get install erofs-utils"):
        runner.require("mkfs.erofs")
