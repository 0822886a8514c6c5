"""The fast loop, for real: `particle shell` runs commands in a build's own /usr (the verified
usr image, mounted read-only) with the factory /etc, and `particle boot --container` boots the
bootcheck image under systemd-nspawn to multi-user, where its check unit reports, reboots once
and powers off. After every run nothing is left: no mount, no loop device, no work directory,
no nspawn."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from particleos.cache import cache_root, sweep_stale

from .conftest import BuildFn

pytestmark = pytest.mark.slow
VERSION = "1.0.0"
STEM = f"particle-minimal_{VERSION}"


@pytest.fixture(scope="module")
def out(build_image: BuildFn) -> Path:
    return build_image("bootcheck", VERSION).output_dir


def particle(*args: str | Path, stdin: str | None = None, timeout: float = 300) \
        -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "particleos", *map(str, args)], input=stdin,
                          capture_output=True, text=True, check=False, timeout=timeout)


def leftovers(build: Path) -> list[str]:
    """Loop devices on the build's usr image, mounts of it or of container roots, container
    work directories, nspawn processes: all must be gone once `particle` has exited."""
    usr = str((build / f"{STEM}.usr.raw").resolve())
    found = subprocess.run(["losetup", "--noheadings", "-O", "NAME", "-j", usr],
                           capture_output=True, text=True, check=True).stdout.split()
    found += [line for line in Path("/proc/self/mountinfo").read_text().splitlines()
              if "/work/container-" in line or usr in line]
    work = cache_root() / "work"
    found += [p.name for p in work.glob("container-*")] if work.is_dir() else []
    for stat in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            cmdline = stat.read_bytes().split(b"\0")
        except OSError:
            continue
        if cmdline[0].endswith(b"systemd-nspawn") and any(b"/work/container-" in a
                                                          for a in cmdline):
            found.append(b" ".join(cmdline).decode(errors="replace"))
    return found


def checks(console: str) -> list[dict[str, str]]:
    """The check unit's `PARTICLE-CHECK key=value` lines, one dict per boot."""
    boots: list[dict[str, str]] = [{}]
    for key, value in re.findall(r"PARTICLE-CHECK ([\w-]+)=?(.*?)\r?\n", console):
        boots[-1][key] = value
        if key.startswith("done-"):
            boots.append({})
    return boots[:-1] if not boots[-1] else boots


def test_shell_runs_the_builds_usr_with_a_fresh_root(out: Path, tmp_path: Path) -> None:
    r = particle("shell", out, "cat", "/usr/lib/os-release")
    assert r.returncode == 0, r.stderr
    assert f'IMAGE_VERSION="{VERSION}"' in r.stdout
    assert r.stderr == ""  # a command runner: the output is the command's
    # /usr is the build's erofs image, read-only; /etc is its factory copy.
    r = particle("shell", out, "sh", "-c",
                 "findmnt -no FSTYPE,OPTIONS /usr; head -n1 /etc/motd; "
                 "touch /usr/x 2>/dev/null && echo usr-writable || echo usr-refused; "
                 "echo note > /etc/particle-note")
    assert r.returncode == 0, r.stderr
    fstype, motd, usr_write = r.stdout.splitlines()
    assert fstype.startswith("erofs ") and ",ro," in f",{fstype.split()[1]},"
    assert motd == "Welcome to particle-minimal (ParticleOS)."
    assert usr_write == "usr-refused"
    # The exit status and stdin pass through; the root was thrown away.
    r = particle("shell", out, "sh", "-c", "cat; test -e /etc/particle-note; exit $(($? + 6))",
                 stdin="from stdin\n")
    assert (r.returncode, r.stdout) == (7, "from stdin\n"), r.stderr
    assert leftovers(out) == []


def test_shell_keep_keeps_the_root(out: Path, tmp_path: Path) -> None:
    keep = tmp_path / "state"
    r = particle("shell", "--keep", keep, out, "sh", "-c",
                 "echo kept > /etc/particle-note && echo kept > /var/particle-note")
    assert r.returncode == 0, r.stderr
    r = particle("shell", "--keep", keep, out, "cat", "/etc/particle-note", "/var/particle-note")
    assert (r.returncode, r.stdout) == (0, "kept\nkept\n"), r.stderr
    # The kept root is the machine's: stamped with the version its /etc came from, and the
    # image's own etcmerge recorded that version's factory /etc.
    assert f'IMAGE_VERSION="{VERSION}"' in (keep / "etc/.particle-factory").read_text()
    assert (keep / "var/lib/particle/etc/factory" / VERSION).is_dir()
    assert not (keep / "usr/lib").exists()  # /usr was only mounted there
    assert leftovers(out) == []


def test_shell_refuses_a_usr_image_that_is_not_the_built_one(out: Path, tmp_path: Path) -> None:
    copy = tmp_path / "out"
    copy.mkdir()
    for f in out.glob(f"{STEM}.*"):
        if not f.name.endswith(f"{STEM}.raw"):  # not the 3 GB disk image
            subprocess.run(["cp", "--reflink=auto", str(f), str(copy)], check=True)
    usr = copy / f"{STEM}.usr.raw"
    with usr.open("r+b") as f:  # one byte in the middle of the file system
        f.seek(usr.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    r = particle("shell", copy, "true")
    assert r.returncode == 1
    assert f"{STEM}.usr.raw does not match the root hash in {STEM}.manifest.json" in r.stderr
    assert "Traceback" not in r.stderr


def test_boot_container_reaches_multi_user_and_powers_off(out: Path) -> None:
    start = time.monotonic()
    r = particle("boot", "--container", out, "--json", timeout=900)
    elapsed = time.monotonic() - start
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout)
    first, second = checks(r.stderr)
    for boot in (first, second):
        assert boot["multi-user"] == "active"
        assert boot["system-state"] == "running"
        assert boot["image-version"] == VERSION
        assert (boot["usr-fstype"], boot["usr-mount"], boot["usr-write"]) \
            == ("erofs", "ro", "refused")
        assert boot["root-write"] == "ok"
    # The check unit rebooted after the first boot: the same root came up again, with what
    # the first boot wrote, then it powered off and particle exited with it.
    assert (first["boot-count"], second["boot-count"]) == ("1", "2")
    assert second["persisted"] == "running"
    assert first["machine-id"] == second["machine-id"]
    assert (result["boots"], result["exit_status"], result["version"]) == (2, 0, VERSION)
    assert result["multi_user_seconds"] is not None
    assert leftovers(out) == []
    print(f"\ncontainer boot: multi-user after {result['multi_user_seconds']} s; two boots "
          f"and the poweroff in {result['seconds']} s ({elapsed:.1f} s with particle's start)")


def test_boot_container_expect_then_clean_shutdown(out: Path) -> None:
    r = particle("boot", "--container", out, "--expect", "PARTICLE-CHECK multi-user=active",
                 "--timeout", "600", timeout=900)
    assert r.returncode == 0, r.stderr
    assert "particle boot: found 'PARTICLE-CHECK multi-user=active' after" in r.stderr
    assert "PARTICLE-CHECK multi-user=active" in r.stdout
    # particle ended the system through its own shutdown (or the reboot its check unit had
    # just asked for), not by killing it.
    assert re.search(r"Container \S+ (has been shut down|is being rebooted)", r.stdout)
    assert leftovers(out) == []


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_boot_container_interrupted_leaves_nothing(out: Path, sig: int, status: int) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "particleos", "boot", "--container", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    console = b""
    while b"Reached target" not in console:  # systemd is starting units in the container
        line = proc.stdout.readline()
        assert line, console.decode(errors="replace")
        console += line
    proc.send_signal(sig)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == status, (console + rest).decode(errors="replace")[-3000:]
    assert rest.rstrip().endswith(b"interrupted")
    assert leftovers(out) == []


def test_boot_container_of_a_killed_particle_shuts_down(out: Path) -> None:
    """SIGKILL gives particle no chance to clean up: nspawn gets SIGTERM from the kernel
    (parent-death signal), the system shuts down, the namespace and its mounts go; the work
    directory is left for the next build's sweep, like a killed build's."""
    proc = subprocess.Popen([sys.executable, "-m", "particleos", "boot", "--container", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    console = b""
    while b"Reached target" not in console:
        line = proc.stdout.readline()
        assert line, console.decode(errors="replace")
        console += line
    proc.kill()
    proc.wait()
    proc.stdout.close()  # as a killed particle's end of the console pipe is
    deadline = time.monotonic() + 120
    while (left := [x for x in leftovers(out) if not x.startswith("container-")]) \
            and time.monotonic() < deadline:
        time.sleep(0.5)
    assert left == []
    assert [p for p in sweep_stale() if p.name.startswith("container-")]
    assert leftovers(out) == []
