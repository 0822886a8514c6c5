"""The build pipeline, top to bottom. Each stage is a function over the BuildContext that
declares the context fields it needs and the ones it gives (osbuild's stages with declared
inputs, mkosi's context of named paths): every result is given by exactly one stage and found
through its field, never by a path convention. A unit test checks the chain, and build() checks
each stage as it runs. Work happens in a private work directory and outputs reach the output
directory only at the end."""

from __future__ import annotations

import copy
import datetime
import shutil
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from pathlib import Path

from ..cache import cache_root, sweep_stale, work_dir
from ..errors import ParticleError, SpecError
from ..runner import interruptible
from ..spec import Spec
from ..spec.checks import check_inputs
from ..tools import ToolsTree
from ..ui import ui
from .artifacts import artifacts
from .bootstrap import bootstrap
from .configure import configure
from .context import BuildContext
from .encryption import encrypted_root
from .extensions import extensions, sysext_support
from .hermetic import hermetic
from .images import boot_files, build_uki, disk_image, verity
from .machine import install_machine_tools
from .repart import root_partition
from .trust import install_trust, sign_uki, sign_verity
from .updates import update_definitions
from .usrimage import usr_image

# Given by the caller before the first stage.
INPUTS = frozenset({"spec", "version", "output_dir", "work_dir", "tools", "staging"})
# What build() reads into the BuildResult once the last stage ran.
RESULTS = frozenset({"disk", "artifacts", "root_hash", "kernel_version", "cache_hit", "tree_path",
                     "sizes"})
FIELDS = frozenset(f.name for f in fields(BuildContext)) | {"staging"}


@dataclass(frozen=True)
class Stage:
    """One step of the build. `needs` and `gives` name BuildContext fields; a stage must assign
    every field it gives (None where the build has no such result, e.g. an unsigned build's
    signature) and no other. Stages that only edit the tree in place need `tree`, give nothing."""

    name: str  # key of BuildResult.timings
    title: str  # shown while it runs
    run: Callable[[BuildContext], None]
    needs: frozenset[str] = frozenset()
    gives: frozenset[str] = frozenset()


def stage(name: str, title: str, run: Callable[[BuildContext], None], *, needs: str = "",
          gives: str = "") -> Stage:
    return Stage(name, title, run, frozenset(needs.split()), frozenset(gives.split()))


STAGES: list[Stage] = [
    stage("bootstrap", "bootstrap: Debian tree (cached)", bootstrap,
          gives="tree tree_key cache_hit tree_path kernel_version"),
    stage("configure", "configure: users, services, files", configure, needs="tree"),
    stage("trust", "trust anchors: certificate, update keyring, signed boot loader",
          install_trust, needs="tree", gives="bootloader"),
    stage("updates", "updates: sysupdate transfers, boot assessment", update_definitions,
          needs="tree"),
    stage("machine-tools", "machine-side particle command", install_machine_tools,
          needs="tree"),
    stage("root-partition", "root partition: first-boot repart definition", root_partition,
          needs="tree"),
    stage("encryption", "encrypted root: recovery key", encrypted_root, needs="tree"),
    stage("sysext-support", "system extensions: merged at boot", sysext_support, needs="tree"),
    stage("boot-files", "kernel and initrd", boot_files, needs="tree kernel_version",
          gives="vmlinuz initrd"),
    # It empties /boot: the kernel and initrd must have been copied out before.
    stage("hermetic", "hermetic /usr and factory /etc", hermetic, needs="tree vmlinuz initrd"),
    stage("usr-image", "usr file system image", usr_image, needs="tree", gives="usr_image"),
    stage("verity", "dm-verity hash tree", verity, needs="usr_image",
          gives="verity_image root_hash"),
    stage("verity-signature", "verity signature", sign_verity, needs="root_hash",
          gives="verity_sig usr_signature_cmdline"),
    stage("uki", "unified kernel image", build_uki,
          needs="tree kernel_version vmlinuz initrd root_hash usr_signature_cmdline",
          gives="uki"),
    stage("uki-signature", "Secure Boot signature of the UKI", sign_uki, needs="uki",
          gives="boot_uki"),
    stage("disk", "GPT disk image", disk_image,
          needs="bootloader boot_uki usr_image verity_image verity_sig root_hash",
          gives="disk"),
    stage("extensions", "extensions: sysext images from the spec", extensions,
          needs="tree kernel_version", gives="extra_artifacts extensions_info"),
    stage("artifacts", "update artifacts and SHA256SUMS", artifacts,
          needs="tree tree_key tree_path kernel_version root_hash usr_image verity_image "
                "verity_sig boot_uki disk extra_artifacts extensions_info",
          gives="artifacts sizes"),
]


def check_contracts(stages: Iterable[Stage], inputs: frozenset[str] = INPUTS,
                    results: frozenset[str] = RESULTS) -> list[str]:
    """Problems with the declarations of a stage table, one line each (none: the chain holds).
    Every need is given earlier, no field is given twice, every result is read by a later
    stage or by the BuildResult, and every name is a BuildContext field."""
    problems: list[str] = []
    stages = list(stages)
    given: dict[str, str] = {f: "the caller" for f in inputs}
    for i, st in enumerate(stages):
        for f in sorted((st.needs | st.gives) - FIELDS):
            problems.append(f"{st.name}: {f} is not a BuildContext field")
        for f in sorted(st.needs - given.keys()):
            problems.append(f"{st.name}: needs {f}, which no earlier stage gives")
        for f in sorted(st.gives & given.keys()):
            problems.append(f"{st.name}: gives {f}, already given by {given[f]}")
        for f in sorted(st.gives - given.keys()):
            given[f] = st.name
        later = set(results).union(*(s.needs for s in stages[i + 1:]))
        for f in sorted(st.gives - later):
            problems.append(f"{st.name}: gives {f}, which no later stage needs nor the result")
    for f in sorted(results - given.keys()):
        problems.append(f"the build result reads {f}, which no stage gives")
    return problems


class StageContractError(ParticleError):
    """A stage broke its declaration: a bug in ParticleOS, not in the spec."""


def _snapshot(ctx: BuildContext, names: Iterable[str]) -> dict[str, object]:
    """Values to compare after a stage; containers copied, so in-place edits show too."""
    snap: dict[str, object] = {}
    for name in names:
        value = getattr(ctx, name)
        snap[name] = copy.copy(value) if isinstance(value, (dict, list, set)) else value
    return snap


def run_stage(st: Stage, ctx: BuildContext, given: frozenset[str]) -> float:
    """Run one stage, check it kept its declaration, and return its own wall time in seconds
    (nested ui.step()s, e.g. bootstrap's package installation, are part of it)."""
    before = _snapshot(ctx, given - {"staging"})
    ctx.take_assigned()
    start = time.monotonic()
    with ui.step(st.title):
        st.run(ctx)
    elapsed = time.monotonic() - start
    assigned = ctx.take_assigned()
    changed = {f for f, v in before.items()
               if not (getattr(ctx, f) is v or getattr(ctx, f) == v)}
    problems = [f"assigned {f}, which it does not give" for f in sorted(assigned - st.gives)]
    problems += [f"did not assign {f}, which it gives" for f in sorted(st.gives - assigned)]
    problems += [f"changed {f}, given before it" for f in sorted(changed - assigned)]
    if problems:
        raise StageContractError(
            f"internal error: stage {st.name} broke its declaration: {'; '.join(problems)}")
    return elapsed


@dataclass
class BuildResult:
    id: str
    version: str
    output_dir: Path
    disk: Path
    artifacts: dict[str, Path]
    root_hash: str
    kernel: str
    cache_hit: bool
    tree_path: str
    sizes: dict[str, int]
    timings: dict[str, float]

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "version": self.version,
            "output_dir": str(self.output_dir),
            "disk": str(self.disk),
            "artifacts": {k: str(v) for k, v in self.artifacts.items()},
            "root_hash": self.root_hash,
            "kernel": self.kernel,
            "cache_hit": self.cache_hit,
            "tree_path": self.tree_path,
            "sizes": self.sizes,
            "timings": self.timings,
        }


def resolve_version(spec: Spec) -> str:
    v = spec.system.version
    if v == "auto":
        return datetime.datetime.now(datetime.UTC).strftime("%Y%m%d%H%M%S")
    return v


def build(spec: Spec, output_dir: Path, version: str | None = None) -> BuildResult:
    """Run every stage; on any failure or interrupt (SIGINT, SIGTERM) the output directory is
    left as it was and the work directory is gone."""
    version = version or resolve_version(spec)
    problems = check_inputs(spec, version)  # load_spec ran them too; `version` may be new
    if problems:
        raise SpecError([p.line(spec.origin) for p in problems],
                        hints=[p.hint for p in problems if p.hint])
    output_dir = output_dir.resolve()
    work = cache_root() / "work" / f"{spec.system.id}_{version}-{uuid.uuid4().hex[:8]}"
    ctx = BuildContext(
        spec=spec, version=version, output_dir=output_dir, work_dir=work,
        tools=ToolsTree(spec.system.mirror),
    )
    timings: dict[str, float] = {}
    with interruptible():
        for stale in sweep_stale():
            ui.debug(f"removed {stale} (left by a build that was killed)")
        with work_dir(work):
            ctx.staging.mkdir()
            ctx.tools.ensure()
            given = INPUTS
            for st in STAGES:
                timings[st.name] = round(run_stage(st, ctx, given), 2)
                given |= st.gives
    assert ctx.disk is not None and ctx.artifacts is not None and ctx.sizes is not None
    return BuildResult(
        id=ctx.image_id, version=version, output_dir=output_dir,
        disk=output_dir / ctx.disk.name, artifacts=ctx.artifacts,
        root_hash=ctx.root_hash.hex(), kernel=ctx.kernel_version, cache_hit=ctx.cache_hit,
        tree_path=ctx.tree_path, sizes=ctx.sizes, timings=timings,
    )


def clean(output_dirs: list[Path], caches: bool) -> list[Path]:
    """Remove build outputs (and with caches=True the tree, tools and apt caches)."""
    removed: list[Path] = []
    for d in output_dirs:
        if d.exists():
            shutil.rmtree(d)
            removed.append(d)
    if caches and cache_root().exists():
        shutil.rmtree(cache_root())
        removed.append(cache_root())
    return removed
