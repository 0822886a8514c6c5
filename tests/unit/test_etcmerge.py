"""The /etc three-way merge on fake roots: every merge rule, rollback, the initrd script's
first boot, and a power cut at every step of a merge (the next boot finds the old or the
merged /etc, never a mixture, and finishes the job)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from particleos.machine import etc as etc_verbs
from particleos.machine import etcmerge
from particleos.machine.cli import main as machine_main
from particleos.machine.status import render

SCRIPT = (Path(__file__).resolve().parents[2]
          / "src/particleos/data/dracut/90particle/particle-etc.sh")


def make_tree(root: Path, files: dict[str, object]) -> None:
    """"path": "content" | ("content", mode) | "->target" (a symlink) | "/" (a directory)."""
    for rel, spec in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if spec == "/":
            p.mkdir(exist_ok=True)
        elif isinstance(spec, str) and spec.startswith("->"):
            p.symlink_to(spec[2:])
        elif isinstance(spec, tuple):
            p.write_text(spec[0])
            p.chmod(spec[1])
        else:
            p.write_text(str(spec))
            p.chmod(0o644)


V1_FACTORY: dict[str, object] = {
    "motd": "welcome to v1\n",
    "hostname": "particle\n",
    "app/changes.conf": "level=1\n",
    "app/goes-away.conf": "old\n",
    "app/secret": ("s1\n", 0o600),
    "app/mode.conf": ("m\n", 0o644),
    "link": "->motd",
    "tools/": "/",
    "tools/a": "a\n",
    "deleted-here": "x\n",
}
V2_FACTORY: dict[str, object] = {
    "motd": "welcome to v2\n",
    "hostname": "particle\n",
    "app/changes.conf": "level=2\n",
    "app/added.conf": "new in v2\n",
    "app/secret": ("s1\n", 0o600),
    "app/mode.conf": ("m\n", 0o640),
    "link": "->hostname",
    "tools": "->app",  # a directory becomes a symlink
    "deleted-here": "x\n",
}


def set_version(root: Path, version: str, factory: dict[str, object]) -> None:
    """What booting `version` means for the root: its /usr (os-release, factory /etc)."""
    usr = root / "usr"
    if usr.exists():
        etcmerge.remove_tree(usr)
    (usr / "lib").mkdir(parents=True)
    (usr / "lib/os-release").write_text(f'ID=debian\nIMAGE_ID=t\nIMAGE_VERSION="{version}"\n')
    fac = usr / "share/factory/etc"
    fac.mkdir(parents=True)
    make_tree(fac, factory)
    (usr / "share/factory/var/lib").mkdir(parents=True)


def first_boot(root: Path) -> None:
    """The initrd script itself populates the empty root (its chroot step is skipped: the
    fake root has no Python), then the merge records the factory base."""
    subprocess.run(["sh", str(SCRIPT), str(root)], check=True, capture_output=True)
    assert etcmerge.boot(root) == f"/etc belongs to {etcmerge.stamp_version(root / 'etc')}"


def snapshot(etc: Path) -> dict[str, etcmerge.Node]:
    return etcmerge.scan(etc) | {".stamp": etcmerge.Node("v", 0, 0, 0,
                                                         etcmerge.stamp_version(etc) or "")}


def owner_edits(etc: Path) -> None:
    (etc / "motd").write_text("my own motd\n")  # changed here and in v2: a conflict
    (etc / "local.conf").write_text("mine\n")  # added here
    (etc / "deleted-here").unlink()  # removed here, unchanged in v2
    (etc / "app/secret").chmod(0o400)  # mode changed here only


@pytest.fixture
def v1_root(tmp_path: Path) -> Path:
    root = tmp_path / "sysroot"
    root.mkdir()
    set_version(root, "1", V1_FACTORY)
    first_boot(root)
    owner_edits(root / "etc")
    return root


def test_first_boot_populates_etc_and_records_the_factory(v1_root: Path) -> None:
    root = v1_root
    assert etcmerge.stamp_version(root / "etc") == "1"
    assert (root / "etc/hostname").read_text() == "particle\n"
    assert os.readlink(root / "etc/link") == "motd"
    assert etcmerge.scan(root / "var/lib/particle/etc/factory/1") == \
        etcmerge.scan(root / "usr/share/factory/etc")


def test_update_merges_three_ways(v1_root: Path) -> None:
    root = v1_root
    etc = root / "etc"
    set_version(root, "2", V2_FACTORY)
    what = etcmerge.boot(root)
    assert "merged /etc from 1 into 2: 1 conflict(s)" in what
    assert etcmerge.stamp_version(etc) == "2"
    # Unchanged here: the new factory's, with new and removed files, modes, links.
    assert (etc / "app/changes.conf").read_text() == "level=2\n"
    assert (etc / "app/added.conf").read_text() == "new in v2\n"
    assert not (etc / "app/goes-away.conf").exists()
    assert (etc / "app/mode.conf").stat().st_mode & 0o777 == 0o640
    assert os.readlink(etc / "link") == "hostname"
    assert os.readlink(etc / "tools") == "app"  # a directory replaced by a symlink
    # Changed here only: kept (content, addition, removal, mode).
    assert (etc / "local.conf").read_text() == "mine\n"
    assert not (etc / "deleted-here").exists()
    assert (etc / "app/secret").stat().st_mode & 0o777 == 0o400
    # Changed on both sides: ours kept, theirs beside it, listed until resolved.
    assert (etc / "motd").read_text() == "my own motd\n"
    assert (etc / "motd.particle-new").read_text() == "welcome to v2\n"
    listed = etcmerge.conflicts(etc)
    assert [(c["path"], c["new_factory_version"], c["since"]) for c in listed] == [
        ("/etc/motd", "/etc/motd.particle-new", "2")]
    # The /etc v1 had is kept for a rollback, v2's factory is the next base.
    saved = root / "var/lib/particle/etc/saved/1"
    assert (saved / "motd").read_text() == "my own motd\n"
    assert (saved / "app/goes-away.conf").exists()
    assert (root / "var/lib/particle/etc/factory/2/app/added.conf").exists()
    assert not (root / etcmerge.NEW_TREE).exists()
    # Resolved once the owner removes the saved file.
    (etc / "motd.particle-new").unlink()
    assert etcmerge.conflicts(etc) == []


def test_rollback_boots_with_the_etc_that_version_had_and_forward_again(v1_root: Path) -> None:
    root = v1_root
    etc = root / "etc"
    before = snapshot(etc)
    set_version(root, "2", V2_FACTORY)
    etcmerge.boot(root)
    (etc / "written-on-2").write_text("2\n")
    merged = snapshot(etc)
    set_version(root, "1", V1_FACTORY)  # rollback (or the fallback after a failed trial)
    assert "restored the /etc 1 had" in etcmerge.boot(root)
    assert snapshot(etc) == before
    set_version(root, "2", V2_FACTORY)  # and forward again: v2's own /etc comes back
    assert "restored" in etcmerge.boot(root)
    assert snapshot(etc) == merged
    # A third version merges from the /etc that runs (v2's), with v2's factory as the base.
    v3 = dict(V2_FACTORY, hostname="renamed\n")
    set_version(root, "3", v3)
    assert "merged /etc from 2 into 3" in etcmerge.boot(root)
    assert (etc / "hostname").read_text() == "renamed\n"
    assert (etc / "written-on-2").exists()
    assert (etc / "motd").read_text() == "my own motd\n"
    # Only what can still be needed is kept: v2's /etc, the factories of 2 and 3.
    state = root / "var/lib/particle/etc"
    assert sorted(os.listdir(state / "saved")) == ["2"]
    assert sorted(os.listdir(state / "factory")) == ["2", "3"]


def test_merge_rules_on_directories_and_deletions(tmp_path: Path) -> None:
    base, theirs, ours = tmp_path / "b", tmp_path / "t", tmp_path / "o"
    make_tree(base, {"d/x": "1", "e/y": "1", "f/z": "1", "g": "1", "same": "1"})
    make_tree(theirs, {"d/x": "2", "f/z": "2", "g": "2", "same": "2", "h": "new"})
    make_tree(base, {"k/u": "1", "k/v": "1"})
    make_tree(ours, {"d/x": "1", "d/mine": "m", "e/y": "1", "e/added": "a", "g": "1",
                     "same": "2", "h": "mine", "k/u": "1", "k/v": "changed"})
    # d: merged path by path. e: removed by the factory, a file was added in it here: the
    # factory's file goes, the owner's stays. k: removed by the factory, a file changed here:
    # kept and listed, the unchanged one goes. f: removed here, changed in the factory:
    # stays removed, the factory's saved beside.
    # same: changed alike on both sides. h: added on both sides differently: a conflict.
    p = etcmerge.plan(etcmerge.scan(base), etcmerge.scan(theirs), etcmerge.scan(ours))
    out = tmp_path / "out"
    etcmerge.build(p, theirs, ours, out)
    got = {str(f.relative_to(out)): f.read_text() for f in sorted(out.rglob("*")) if f.is_file()}
    assert got == {"d/x": "2", "d/mine": "m", "e/added": "a", "g": "2",
                   "same": "2", "h": "mine", "h.particle-new": "new",
                   "f.particle-new/z": "2", "k/v": "changed"}
    reasons = {c["path"]: c["reason"] for c in p.conflicts}
    assert reasons == {"k/v": "changed here, removed in the new version",
                       "f": "removed here, changed in the new version",
                       "h": "changed here and in the new version"}


def test_owner_and_type_changes_count_as_changes(tmp_path: Path) -> None:
    base, theirs, ours = tmp_path / "b", tmp_path / "t", tmp_path / "o"
    for t in (base, theirs, ours):
        make_tree(t, {"f": "1", "l": "->f"})
    os.chown(ours / "f", 1234, 1234)
    (ours / "l").unlink()
    (ours / "l").write_text("now a file")
    (theirs / "l").unlink()
    (theirs / "l").symlink_to("elsewhere")
    (theirs / "f").write_text("2")
    p = etcmerge.plan(etcmerge.scan(base), etcmerge.scan(theirs), etcmerge.scan(ours))
    assert p.take == {"f": "ours", "l": "ours"}
    assert sorted(p.save_theirs) == ["f", "l"]


@pytest.mark.parametrize("point", ["start", "copy-3", "copy-20", "before-stamp", "built",
                                   "swapped", "settled"])
def test_power_cut_at_any_step_leaves_a_whole_etc(
    v1_root: Path, tmp_path: Path, point: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = v1_root
    etc = root / "etc"
    before = snapshot(etc)
    # The result of an uninterrupted merge, on a copy of the same machine.
    clean = tmp_path / "clean"
    etcmerge.copy_tree(root, clean)
    set_version(clean, "2", V2_FACTORY)
    etcmerge.boot(clean)
    merged = snapshot(clean / "etc")

    class PowerCut(Exception):
        pass

    if point.startswith("copy-"):
        calls = {"n": 0}
        real = etcmerge.copy_node

        def cut_copy(src: Path, dst: Path) -> None:
            calls["n"] += 1
            if calls["n"] == int(point[5:]):
                raise PowerCut
            real(src, dst)

        monkeypatch.setattr(etcmerge, "copy_node", cut_copy)
    else:
        def cut(name: str) -> None:
            if name == point:
                raise PowerCut

        monkeypatch.setattr(etcmerge, "crash_point", cut)
    set_version(root, "2", V2_FACTORY)
    with pytest.raises(PowerCut):
        etcmerge.boot(root)
    assert snapshot(etc) in (before, merged)
    monkeypatch.undo()
    etcmerge.boot(root)  # the next boot
    assert snapshot(etc) == merged
    assert not (root / etcmerge.NEW_TREE).exists()
    assert not (root / "var/lib/particle/etc/trash").exists()
    assert snapshot(root / "var/lib/particle/etc/saved/1") == before


def test_etc_diff_and_revert(v1_root: Path, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]) -> None:
    root = v1_root
    monkeypatch.setattr(etc_verbs, "ETC", root / "etc")
    monkeypatch.setattr(etc_verbs, "FACTORY", root / "usr/share/factory/etc")
    assert machine_main(["etc", "diff"]) == 0
    out = capsys.readouterr().out
    assert "changed  /etc/motd" in out and "added    /etc/local.conf" in out
    assert "removed  /etc/deleted-here" in out and "mode     /etc/app/secret  0600 -> 0400" in out
    assert "-welcome to v1\n+my own motd" in out  # a unified diff of text files
    assert machine_main(["etc", "diff", "--json", "/etc/app"]) == 0
    assert json.loads(capsys.readouterr().out) == [
        {"path": "/etc/app/secret", "change": "mode", "detail": "0600 -> 0400"}]
    (root / "etc/motd.particle-new").write_text("x")
    etcmerge.write_conflicts(root / "etc", [{"path": "motd", "saved": "motd.particle-new",
                                             "reason": "r", "since": "2"}])
    assert machine_main(["etc", "revert", "/etc/motd"]) == 0
    assert (root / "etc/motd").read_text() == "welcome to v1\n"
    assert not (root / "etc/motd.particle-new").exists()
    assert etcmerge.conflicts(root / "etc") == []
    capsys.readouterr()
    assert machine_main(["etc", "revert", "local.conf"]) == 1
    assert "not in this version's factory /etc" in capsys.readouterr().err
    assert machine_main(["etc", "diff", "motd"]) == 0
    assert "no changes against the factory /etc under /etc/motd" in capsys.readouterr().out


def test_status_lists_conflicts() -> None:
    st = {"id": "t", "version": "2", "running_slot": "A", "booted_entry": None,
          "boot_assessment": {"bless_boot": "good", "boot_complete": "active"},
          "slots": [], "entries": [], "pending": None, "update_source": None, "notes": [],
          "etc": {"derived_from": "2", "conflicts": [
              {"path": "/etc/motd", "new_factory_version": "/etc/motd.particle-new",
               "reason": "changed here and in the new version", "since": "2"}]}}
    assert ("/etc conflict: /etc/motd kept as changed here; new factory version in "
            "/etc/motd.particle-new (since 2") in render(st)
