"""ToolsTree with its own package list and location (the mkosi benchmark's tools tree)."""

from __future__ import annotations

from pathlib import Path

from particleos.tools import TOOLS_PACKAGES, ToolsTree


def test_package_list_decides_the_tree(tmp_path: Path) -> None:
    default = ToolsTree(where=tmp_path)
    assert default.packages == TOOLS_PACKAGES
    other = ToolsTree(packages=("mkosi", "apt"), where=tmp_path, marker="usr/bin/mkosi")
    assert other.path.parent == tmp_path
    assert other.path != default.path
    assert ToolsTree(packages=("mkosi", "apt"), where=tmp_path).path == other.path


def test_a_complete_tree_is_reused_without_bootstrapping(tmp_path: Path) -> None:
    tree = ToolsTree(packages=("mkosi",), where=tmp_path, marker="usr/bin/mkosi")
    (tree.path / "usr/bin").mkdir(parents=True)
    (tree.path / "usr/bin/mkosi").write_text("#!/bin/sh\n")
    # No mmdebstrap runs (it would need root and the network): the marker says it is complete.
    assert tree.ensure() == tree.path
