"""`particle boot --container` and `particle shell` around a stand-in for systemd-nspawn: the
real usr check, the real private-namespace loop mount and the real root made from the factory
copies, then a fake nspawn (first on PATH) that plays a booting system: reboots, hangs until
SIGTERM. Fast; the real nspawn boot is in tests/integration/test_container.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from particleos.builder.bootstrap import skeleton_files
from particleos.cache import sweep_stale
from particleos.container import attached_loops
from particleos.formats import Manifest
from particleos.verity import format_verity

from .conftest import Run

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("mkfs.erofs") is None or shutil.which("unshare") is None,
    reason="needs root (loop mounts) and mkfs.erofs",
)

FAKE_NSPAWN = """\
#!/bin/sh
# Plays systemd-nspawn -b: the root is in --directory, /usr is mounted in it.
root=""
while [ $# -gt 0 ]; do
    case "$1" in --directory) root="$2"; shift 2 ;; --) shift; break ;; *) shift ;; esac
done
if [ "$FAKE_NSPAWN" = hang ]; then
    trap 'echo term > "$root/var/term"; echo "Container fake has been shut down."; exit 0' TERM
fi
echo "$*" > "$root/var/init-args"
echo boot >> "$root/var/boots"
. "$root/usr/lib/os-release"
echo "Welcome to $PRETTY_NAME ($(cat "$root/etc/motd"))"
echo "[  OK  ] Reached target multi-user.target - Multi-User System."
case "$FAKE_NSPAWN" in
    reboot-once)
        if [ "$(wc -l < "$root/var/boots")" -eq 1 ]; then
            echo "Container fake is being rebooted."; exit 133
        fi
        echo "Container fake has been shut down."; exit 0 ;;
    hang)
        while :; do sleep 0.1; done ;;
esac
"""


def fake_build(tmp: Path, *, filesystem_ok: bool = True) -> Path:
    """A build directory as `particle build` leaves it, as far as containers look: an erofs
    usr image with os-release, factory /etc and the initrd's particle-etc.sh, its verity tree
    and the manifest."""
    usr = tmp / "usr"
    (usr / "lib").mkdir(parents=True)
    (usr / "lib/os-release").write_text('PRETTY_NAME="Fake 1"\nIMAGE_VERSION="1"\n')
    (usr / "share/factory/etc").mkdir(parents=True)
    (usr / "share/factory/etc/motd").write_text("factory motd\n")
    for name, data in skeleton_files().items():  # particle-etc.sh, as builds ship it
        if name.startswith("usr/"):
            (usr / name[4:]).parent.mkdir(parents=True, exist_ok=True)
            (usr / name[4:]).write_bytes(data)
    out = tmp / "out"
    out.mkdir()
    image = out / "fake_1.usr.raw"
    if filesystem_ok:
        subprocess.run(["mkfs.erofs", str(image), str(usr)], check=True,
                       capture_output=True)
        with image.open("ab") as f:  # whole verity blocks
            f.truncate(-(-image.stat().st_size // 4096) * 4096)
    else:
        image.write_bytes(os.urandom(16 * 4096))
    verity = format_verity(image, out / "fake_1.usr-verity.raw")
    manifest = Manifest(id="fake", version="1", release="trixie", architecture="x86-64",
                        kernel="", usr_filesystem="erofs", root_hash=verity.root_hash_hex)
    (out / manifest.name).write_text(manifest.to_json())
    return out


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The fake nspawn first on PATH, and a private cache (work directories)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    nspawn = bin_dir / "systemd-nspawn"
    nspawn.write_text(FAKE_NSPAWN)
    nspawn.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("PARTICLE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


def nothing_left(build: Path, cache: Path) -> None:
    assert attached_loops(build / "fake_1.usr.raw") == []
    assert [p.name for p in (cache / "work").iterdir()] == []


@needs_root
def test_reboot_starts_the_same_root_again(fake: Path, run: Run,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    out = fake_build(fake)
    monkeypatch.setenv("FAKE_NSPAWN", "reboot-once")
    state = fake / "state"
    r = run("boot", "--container", str(out), "--keep", str(state), "--json")
    assert r.code == 0, r.err
    result = json.loads(r.out)
    assert (result["boots"], result["exit_status"]) == (2, 0)
    assert result["multi_user_seconds"] is not None
    assert "Welcome to Fake 1 (factory motd)" in r.err  # the console goes to stderr with --json
    # The root was made once from the factory copy, and the second boot found the first's.
    assert (state / "var/boots").read_text() == "boot\nboot\n"
    assert (state / "etc/motd").read_text() == "factory motd\n"
    assert (state / "var/init-args").read_text().strip() == "systemd.firstboot=off"
    assert not (state / "usr/lib").exists()  # /usr was only mounted, in another namespace
    nothing_left(out, fake / "cache")


@needs_root
def test_expect_shuts_the_container_down(fake: Path, run: Run,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    out = fake_build(fake)
    monkeypatch.setenv("FAKE_NSPAWN", "hang")
    state = fake / "state"
    r = run("boot", "--container", str(out), "--keep", str(state), "--expect", "multi-user")
    assert r.code == 0, r.err
    assert "particle boot: found 'multi-user' after" in r.err
    assert "Container fake has been shut down." in r.out  # drained after SIGTERM
    assert (state / "var/term").read_text() == "term\n"
    nothing_left(out, fake / "cache")


@needs_root
def test_a_killed_particle_shuts_its_container_down(fake: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    out = fake_build(fake)
    monkeypatch.setenv("FAKE_NSPAWN", "hang")
    state, console = fake / "state", fake / "console"
    with console.open("wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "particleos", "boot", "--container",
                                 str(out), "--keep", str(state)], stdout=f, stderr=f)
    while b"Reached target" not in console.read_bytes():
        assert proc.poll() is None, console.read_text()
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    # The kernel's parent-death signal: nspawn (here the fake) is told to shut down.
    deadline = time.monotonic() + 30
    while not (state / "var/term").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (state / "var/term").read_text() == "term\n"
    while attached_loops(out / "fake_1.usr.raw") and time.monotonic() < deadline:
        time.sleep(0.05)
    # What particle could not remove is the next build's to sweep.
    assert [p.name[:17] for p in sweep_stale(fake / "cache")] == ["container-fake_1-"]
    nothing_left(out, fake / "cache")


@needs_root
def test_expect_timeout_fails_with_the_console(fake: Path, run: Run,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    out = fake_build(fake)
    monkeypatch.setenv("FAKE_NSPAWN", "hang")
    r = run("boot", "--container", str(out), "--expect", "never there", "--timeout", "2")
    assert r.code == 1
    assert "error: timed out after 2 s waiting for 'never there'" in r.err
    assert "last console lines:\n    Welcome to Fake 1" in r.err
    nothing_left(out, fake / "cache")


@needs_root
def test_a_usr_image_that_does_not_mount_is_a_message(fake: Path, run: Run) -> None:
    out = fake_build(fake, filesystem_ok=False)
    r = run("shell", str(out), "true")
    assert r.code == 1
    assert "error: could not set up the container of fake_1.usr.raw" in r.err
    assert "mount" in r.err
    nothing_left(out, fake / "cache")


@needs_root
def test_a_changed_usr_image_is_refused(fake: Path, run: Run) -> None:
    out = fake_build(fake)
    with (out / "fake_1.usr.raw").open("r+b") as f:
        f.write(b"X")
    r = run("shell", str(out), "true")
    assert r.code == 1
    assert "fake_1.usr.raw does not match the root hash in fake_1.manifest.json" in r.err
    assert "hint: rebuild it with `particle build`" in r.err


def test_options_of_the_container_boot_only(run: Run, tmp_path: Path) -> None:
    r = run("boot", "--keep", str(tmp_path / "state"), str(tmp_path))
    assert r.code == 1
    assert "--keep is an option of `particle boot --container`" in r.err
    r = run("shell", str(tmp_path), "true")
    assert r.code == 1
    assert "no build here" in r.err
    # Without --container, `particle boot` is `particle qemu`.
    r = run("boot", str(tmp_path))
    assert r.code == 1
    assert f"no disk image (*.raw) in {tmp_path}; run `particle build` first" in r.err
