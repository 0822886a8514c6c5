"""The stage contracts of the build pipeline: every need is given by an earlier stage, no result
is given twice, the declarations match what the stage code reads, and build() enforces them and
times each stage as a whole while it runs."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from particleos.builder import pipeline
from particleos.builder.context import BuildContext
from particleos.builder.pipeline import (
    INPUTS,
    RESULTS,
    STAGES,
    Stage,
    StageContractError,
    check_contracts,
    run_stage,
    stage,
)
from particleos.spec import load_spec
from particleos.tools import ToolsTree
from particleos.ui import ui

GIVEN = sorted({(st.name, f) for st in STAGES for f in st.gives})


def test_the_stage_table_keeps_its_contracts() -> None:
    assert check_contracts(STAGES) == []


def test_the_build_result_reads_only_declared_results() -> None:
    source = inspect.getsource(pipeline.build)
    read = {node.attr for node in ast.walk(ast.parse(textwrap.dedent(source)))
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
            and node.value.id == "ctx"}
    assert read - {"image_id", "staging", "tools"} == set(RESULTS)


@pytest.mark.parametrize(("producer", "field"), GIVEN)
def test_removing_any_result_from_its_producer_is_reported(producer: str, field: str) -> None:
    """Every declared result is load-bearing: without it a need (or the result) is unmet."""
    table = [dataclasses.replace(st, gives=st.gives - {field}) if st.name == producer else st
             for st in STAGES]
    problems = check_contracts(table)
    assert problems
    assert all(f"needs {field}," in p or f"reads {field}," in p for p in problems), problems


def test_removing_a_stage_is_reported_at_each_stage_that_needs_its_results() -> None:
    table = [st for st in STAGES if st.name != "boot-files"]
    assert check_contracts(table) == [
        "hermetic: needs initrd, which no earlier stage gives",
        "hermetic: needs vmlinuz, which no earlier stage gives",
        "uki: needs initrd, which no earlier stage gives",
        "uki: needs vmlinuz, which no earlier stage gives",
    ]


def test_a_stage_moved_before_its_inputs_is_reported() -> None:
    names = [st.name for st in STAGES]
    table = list(STAGES)
    uki = table.pop(names.index("uki"))
    table.insert(names.index("verity"), uki)
    assert "uki: needs root_hash, which no earlier stage gives" in check_contracts(table)


def test_a_result_given_twice_or_unused_or_misspelled_is_reported() -> None:
    def noop(ctx: BuildContext) -> None:
        pass

    resign = stage("resign", "re-sign", noop, needs="uki", gives="uki")
    names = [st.name for st in STAGES]
    at = names.index("uki-signature")
    table = [*STAGES[:at], resign, *STAGES[at:]]
    assert check_contracts(table) == ["resign: gives uki, already given by uki"]
    first = stage("first", "first", noop, gives="tree vmlinuz")
    assert check_contracts([first], results=frozenset({"tree", "disk"})) == [
        "first: gives vmlinuz, which no later stage needs nor the result",
        "the build result reads disk, which no stage gives",
    ]
    typo = stage("typo", "typo", noop, needs="rootfs")
    assert check_contracts([typo], results=frozenset()) == [
        "typo: rootfs is not a BuildContext field",
        "typo: needs rootfs, which no earlier stage gives",
    ]


# --- the declarations match the code: what a stage reads of the context, it declares ---

CTX_HELPERS = {"image_id", "name", "stable_uuid"}


def ctx_attributes(fn: Callable[..., Any]) -> set[str]:
    """`ctx.X` in a stage function and in every builder function it calls, transitively."""
    seen: set[Callable[..., Any]] = set()
    todo = [fn]
    attrs: set[str] = set()
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        module = sys.modules[f.__module__]
        for node in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(f)))):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id == "ctx"):
                attrs.add(node.attr)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                callee = getattr(module, node.func.id, None)
                if inspect.isfunction(callee) and callee.__module__.startswith(
                        "particleos.builder."):
                    todo.append(callee)
    return attrs


@pytest.mark.parametrize("st", STAGES, ids=lambda st: st.name)
def test_a_stage_reads_only_what_it_declares(st: Stage) -> None:
    used = ctx_attributes(st.run) - CTX_HELPERS
    assert used - st.needs - st.gives - INPUTS == set()
    assert st.gives <= used  # and it sets them


def test_the_attribute_scan_sees_through_helpers() -> None:
    """The scan would catch a need hidden in a helper (configure reads the tree via helpers)."""
    from particleos.builder import configure, images

    assert "tree" in ctx_attributes(configure.apply_users)
    assert {"tree", "kernel_version"} <= ctx_attributes(images.boot_files)


# --- enforced while building ---


@pytest.fixture
def ctx(tmp_path: Path) -> BuildContext:
    (tmp_path / "particle.toml").write_text('[system]\nid = "demo"\n')
    return BuildContext(spec=load_spec(tmp_path), version="1", output_dir=tmp_path / "out",
                        work_dir=tmp_path / "work", tools=ToolsTree())


def test_a_stage_that_assigns_an_undeclared_field_is_stopped(ctx: BuildContext) -> None:
    def sneaky(c: BuildContext) -> None:
        c.uki = Path("/elsewhere.efi")
        c.root_hash = b"\1"

    st = stage("verity", "verity", sneaky, gives="root_hash")
    with pytest.raises(StageContractError,
                       match="stage verity broke its declaration: assigned uki, which it does "
                             "not give"):
        run_stage(st, ctx, INPUTS)


def test_a_stage_that_does_not_give_a_declared_result_is_stopped(ctx: BuildContext) -> None:
    def lazy(c: BuildContext) -> None:
        c.verity_sig = None  # None is a result (unsigned build); not assigning is not

    st = stage("verity-signature", "sig", lazy, gives="verity_sig usr_signature_cmdline")
    with pytest.raises(StageContractError,
                       match="did not assign usr_signature_cmdline, which it gives"):
        run_stage(st, ctx, INPUTS)


def test_a_stage_that_edits_an_earlier_result_in_place_is_stopped(ctx: BuildContext) -> None:
    ctx.usr_signature_cmdline = ["dm_verity.require_signatures=1"]

    def appends(c: BuildContext) -> None:
        assert c.usr_signature_cmdline is not None
        c.usr_signature_cmdline.append("quiet")
        c.uki = Path("/uki.efi")

    st = stage("uki", "uki", appends, needs="usr_signature_cmdline", gives="uki")
    with pytest.raises(StageContractError, match="changed usr_signature_cmdline, given before"):
        run_stage(st, ctx, INPUTS | {"usr_signature_cmdline"})


def test_a_stage_is_timed_whole_even_with_a_nested_step(
    ctx: BuildContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bootstrap on a cache miss opens its own step; the stage's time is still all of it."""
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])

    def slow(c: BuildContext) -> None:
        clock[0] += 2
        with ui.step("Installing packages"):
            clock[0] += 30
        clock[0] += 3
        c.tree = Path("/root")

    elapsed = run_stage(stage("bootstrap", "bootstrap", slow, gives="tree"), ctx, INPUTS)
    assert elapsed == 35
    assert ui.timings[-2] == ("Installing packages", 30)  # what was recorded before
