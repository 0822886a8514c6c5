"""Configure and hermetic stages on a small fake tree (no mirror): files, trees, os-release,
enablement links moving into /usr, and the factory copy of /etc."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from particleos.builder.configure import apply_files, write_os_release
from particleos.builder.context import BuildContext
from particleos.builder.hermetic import hermetic, move_enablement_links
from particleos.spec import load_spec
from particleos.tools import ToolsTree


def make_ctx(tmp_path: Path, toml: str) -> BuildContext:
    spec_dir = tmp_path / "spec"
    spec_dir.mkdir()
    (spec_dir / "particle.toml").write_text(toml)
    (spec_dir / "overlay/etc/ssh").mkdir(parents=True)
    (spec_dir / "overlay/etc/ssh/banner").write_text("from a tree\n")
    (spec_dir / "hello.txt").write_text("from a source file\n")
    tree = tmp_path / "root"
    for d in ("etc/systemd/system/multi-user.target.wants", "usr/lib/systemd/system",
              "var/lib/apt/lists", "var/cache/apt", "boot"):
        (tree / d).mkdir(parents=True)
    ctx = BuildContext(spec=load_spec(spec_dir), version="7", output_dir=tmp_path / "out",
                       work_dir=tmp_path / "work", tools=ToolsTree())
    ctx.tree = tree
    return ctx


SPEC = """
[system]
id = "demo"
[files]
trees = ["overlay"]
"/etc/motd" = { content = "hi\\n", mode = "0600" }
"/usr/local/bin/hello" = { source = "hello.txt", mode = "0755" }
"""


def test_files_trees_and_os_release(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path, SPEC)
    root = ctx.tree
    assert root is not None
    apply_files(ctx)
    write_os_release(ctx)
    assert (root / "etc/ssh/banner").read_text() == "from a tree\n"
    assert (root / "etc/motd").read_text() == "hi\n"
    assert oct((root / "etc/motd").stat().st_mode & 0o777) == "0o600"
    assert (root / "usr/local/bin/hello").read_text() == "from a source file\n"
    assert (root / "usr/local/bin/hello").stat().st_mode & 0o777 == 0o755
    release = (root / "usr/lib/os-release").read_text()
    assert 'IMAGE_ID="demo"' in release and 'IMAGE_VERSION="7"' in release
    assert os.readlink(root / "etc/os-release") == "../usr/lib/os-release"


def test_enablement_links_move_into_usr_and_factory_copy(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path, SPEC)
    root = ctx.tree
    assert root is not None
    units = root / "usr/lib/systemd/system"
    (units / "foo.service").write_text("[Service]\nExecStart=/bin/true\n")
    (units / "getty@.service").write_text("[Service]\nExecStart=/bin/true\n")
    wants = root / "etc/systemd/system/multi-user.target.wants"
    (wants / "foo.service").symlink_to("/usr/lib/systemd/system/foo.service")
    (wants / "getty@tty1.service").symlink_to("/usr/lib/systemd/system/getty@.service")
    (root / "etc/systemd/system/local.service").write_text("[Service]\n")
    (wants / "local.service").symlink_to("/etc/systemd/system/local.service")
    (root / "etc/machine-id").write_text("")
    move_enablement_links(root)
    usr_wants = units / "multi-user.target.wants"
    assert os.readlink(usr_wants / "foo.service") == "../foo.service"
    assert os.readlink(usr_wants / "getty@tty1.service") == "../getty@.service"
    # A unit that only exists in /etc stays enabled from /etc.
    assert (wants / "local.service").is_symlink()
    assert not (wants / "foo.service").exists()
    hermetic(ctx)
    factory = root / "usr/share/factory"
    assert (factory / "etc/systemd/system/local.service").exists()
    assert not (factory / "etc/machine-id").exists()  # generated at first boot
    assert not (factory / "var/lib/apt/lists").exists()
    assert list((root / "boot").iterdir()) == []


def test_remove_tree_detaches_mounts_instead_of_deleting_through_them(tmp_path: Path) -> None:
    """A leftover tree with a bind mount inside must not delete what the mount shows."""
    import subprocess

    from particleos.cache import mounts_below, remove_tree

    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep").write_text("host data")
    tree = tmp_path / "tree"
    (tree / "dev").mkdir(parents=True)
    if subprocess.run(["mount", "--bind", str(precious), str(tree / "dev")],
                      check=False).returncode != 0:
        pytest.skip("bind mounts are not allowed here")
    assert mounts_below(tree) == [str(tree / "dev")]
    remove_tree(tree)
    assert not tree.exists()
    assert (precious / "keep").read_text() == "host data"
