"""An interrupted build leaves nothing behind: SIGTERM and SIGINT unwind the real `particle
build` (the running command's process group is stopped first), and what a build killed outright
left is swept by the next one. A fake mmdebstrap stands in for the mirror (fast); the real one
is in tests/integration/test_interrupt.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from particleos.cache import sweep_stale

FAKE_MMDEBSTRAP = """\
#!/bin/sh
# Like mmdebstrap: fill the target (second to last argument), then keep working.
eval target=\\${{$(($# - 1))}}
mkdir -p "$target/usr/bin" && head -c 1048576 /dev/zero > "$target/usr/bin/big"
sleep 1000 &
echo $! > {marks}/grandchild
echo $$ > {marks}/running
wait
"""


def leftovers(cache: Path) -> list[str]:
    """Work directories, atomic_dir temporaries and lock files anywhere in the cache."""
    found = [p for p in cache.rglob("*") if ".tmp-" in p.name or p.name.endswith(".lock")]
    work = cache / "work"
    found += list(work.iterdir()) if work.exists() else []
    return sorted(str(p.relative_to(cache)) for p in found)


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")  # a zombie waiting for init has stopped running


def wait_for(path: Path, proc: subprocess.Popen[str]) -> None:
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_interrupted_build_leaves_nothing(tmp_path: Path, sig: int, status: int) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    fake = tmp_path / "bin/mmdebstrap"
    fake.parent.mkdir()
    fake.write_text(FAKE_MMDEBSTRAP.format(marks=marks))
    fake.chmod(0o755)
    (tmp_path / "sys").mkdir()
    (tmp_path / "sys/particle.toml").write_text('[system]\nid = "demo"\n')
    cache = tmp_path / "cache"
    env = {**os.environ, "PARTICLE_CACHE_DIR": str(cache),
           "PATH": f"{fake.parent}:{os.environ['PATH']}"}
    proc = subprocess.Popen([sys.executable, "-m", "particleos", "build"], cwd=tmp_path / "sys",
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(marks / "running", proc)
    assert [p for p in leftovers(cache) if p.startswith("work/")]  # the build has its work dir
    proc.send_signal(sig)
    _, err = proc.communicate()
    assert proc.returncode == status, err
    assert err.splitlines()[-1] == "interrupted" and "Traceback" not in err
    assert gone(int((marks / "grandchild").read_text()))  # the whole process group stopped
    assert leftovers(cache) == []
    assert not (tmp_path / "sys/out").exists()


HOLDER = """\
import sys, time
from pathlib import Path
from particleos.cache import atomic_dir, work_dir
cache = Path(sys.argv[1])
with work_dir(cache / "work" / "demo_1-abcd1234") as w, atomic_dir(cache / "trees" / "t") as tmp:
    (w / "root").mkdir()
    tmp.mkdir()
    (tmp / "file").write_text("half a tree")
    print("ready", flush=True)
    time.sleep(1000)
"""


def test_sweep_removes_only_what_a_dead_build_left(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    legacy = cache / "work" / "old-build-without-lock"  # maybe a running older version's
    legacy.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HOLDER), str(cache)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "ready\n"
        held = leftovers(cache)
        assert "work/demo_1-abcd1234" in held and any(".t.tmp-" in p for p in held)
        assert sweep_stale(cache) == []  # the owner is alive: nothing is touched
        assert leftovers(cache) == held
    finally:
        holder.kill()
        holder.wait()
    removed = sorted(str(p.relative_to(cache)) for p in sweep_stale(cache))
    assert removed == [p for p in held if not p.endswith((".lock", "-without-lock"))]
    assert leftovers(cache) == ["work/old-build-without-lock"]
    assert sweep_stale(cache) == []


def test_a_cache_entry_is_made_once_while_others_wait(tmp_path: Path) -> None:
    """Two builds that miss the same entry: the second waits for the first and uses what it
    made instead of making it again and replacing it under the first one's feet."""
    import threading

    from particleos.cache import cache_entry

    final = tmp_path / "trees" / "t1"
    made: list[str] = []
    started = threading.Event()

    def build(name: str) -> None:
        with cache_entry(final, lambda p: (p / "usr").is_dir()) as tmp:
            if tmp is None:
                return
            started.set()
            time.sleep(0.5)  # the other build arrives meanwhile
            (tmp / "usr").mkdir(parents=True)
            (tmp / "usr/maker").write_text(name)
            made.append(name)

    first = threading.Thread(target=build, args=("first",))
    first.start()
    assert started.wait(5)
    build("second")  # blocks until the first is done, then finds the entry ready
    first.join()
    assert made == ["first"]
    assert (final / "usr/maker").read_text() == "first"
    assert sorted(p.name for p in final.parent.iterdir()) == ["t1"]  # lock gone with its maker


def test_makers_of_one_entry_never_overlap_though_the_lock_file_goes(tmp_path: Path) -> None:
    """The lock file is unlinked by its holder; a waiter that locked the unlinked file must
    notice and queue on the new one, or two makers would run at once."""
    import threading

    from particleos.cache import cache_entry

    final = tmp_path / "t1"
    inside: list[int] = []
    overlaps: list[int] = []

    def build() -> None:
        for _ in range(5):
            with cache_entry(final, lambda p: False) as tmp:
                assert tmp is not None
                inside.append(1)
                if len(inside) > 1:
                    overlaps.append(len(inside))
                time.sleep(0.01)
                tmp.mkdir()
                inside.pop()

    threads = [threading.Thread(target=build) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t1"]


def test_builds_take_turns_with_the_shared_apt_cache(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """apt fails at once ("Could not get lock") when another apt holds the shared archives:
    a second build waits for the first instead (CI saw the failure with two xdist workers)."""
    import threading

    from particleos.cache import shared_apt

    monkeypatch.setenv("PARTICLE_CACHE_DIR", str(tmp_path))
    events: list[str] = []
    inside = threading.Event()

    def first() -> None:
        with shared_apt("trixie", lists=True) as binds:
            assert [b[1] for b in binds] == ["/var/cache/apt/archives", "/var/lib/apt/lists"]
            assert all((host / "partial").is_dir() for host, _ in binds)
            inside.set()
            time.sleep(0.3)
            events.append("first done")

    t = threading.Thread(target=first)
    t.start()
    assert inside.wait(5)
    with shared_apt("trixie") as binds:
        events.append("second in")
        assert binds == [(tmp_path / "apt-archives/trixie", "/var/cache/apt/archives")]
    t.join()
    assert events == ["first done", "second in"]
    with shared_apt("bookworm"):  # another release's cache is another lock: no wait
        pass
