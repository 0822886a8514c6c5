#!/usr/bin/env python3
"""Side-by-side benchmark against mkosi (trixie's mkosi 25, run from a trixie tools tree made
the way the builder makes its own) on the same package set: cold build, no-change rebuild,
one-package rebuild, image sizes and boot to `login:` under the same QEMU flags. Prints each
figure and the ratio ours/mkosi (below 1: particle is faster or smaller).

    .venv/bin/python benchmarks/mkosi.py [SPEC] [--package NAME] [--runs N] [--no-boot]

Both tools get a private, throw-away build cache; what stays warm for both is the downloaded
.deb files (particle's shared apt-archives, mkosi's own package cache in the benchmark's cache
directory), after an unmeasured warm-up build of each with the extra package, so the network is
not part of any figure beyond repository metadata. mkosi runs with `Incremental=yes`.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from particleos.builder import build
from particleos.cache import cache_root
from particleos.disk.layout import verity_size
from particleos.errors import ParticleError
from particleos.spec import Spec, load_spec
from particleos.tools import ToolsTree
from particleos.ui import ui
from particleos.vm import VM, VMOptions

REPO = Path(__file__).resolve().parent.parent
# mkosi 25 and what it calls to build a Debian disk image; its Depends bring apt, repart's
# file system tools (erofs-utils, dosfstools, mtools, e2fsprogs), cpio and kmod for the initrd.
MKOSI_PACKAGES = (
    "mkosi", "apt", "debian-archive-keyring", "systemd", "systemd-container", "systemd-repart",
    "systemd-ukify", "systemd-boot", "systemd-boot-efi", "erofs-utils", "dosfstools", "mtools",
    "e2fsprogs", "cryptsetup-bin", "fdisk", "util-linux", "kmod", "cpio", "zstd", "xz-utils",
    "python3-pefile", "openssl", "sbsigntool", "uidmap",
)
BOOT_TIMEOUT = 900.0
STEP = re.compile(r"^‣ {1,2}(\S.*)$")
NOT_STEPS = ('"', "not found", "is a dependency", " consumes ")  # messages, not steps


def package_list(spec: Spec) -> list[str]:
    """The packages particle's bootstrap installs for `spec` (base layer + the spec's)."""
    from particleos.builder import bootstrap

    return list(bootstrap.package_list(spec))


# --- mkosi -----------------------------------------------------------------------------------


def mkosi_config(
    root: Path, spec: Spec, packages: list[str], version: str, pkgcache: Path
) -> Path:
    """A mkosi project equivalent to the spec: Debian release/mirror/packages of our bootstrap,
    a disk image with ESP (systemd-boot + UKI), an erofs /usr with verity (usrhash= on the
    UKI's command line), an empty slot B of the same sizes and an ext4 root."""
    conf = root / "project"
    shutil.rmtree(conf, ignore_errors=True)
    (conf / "mkosi.repart").mkdir(parents=True)
    s, img = spec.system, spec.image
    # Our configure stage writes what systemd-firstboot would ask for; `mkosi qemu` passes it
    # as credentials. Booted with our QEMU flags, the mkosi image must not stop at the prompt.
    cmdline = " ".join([*spec.kernel.cmdline, "systemd.firstboot=off"])
    (conf / "mkosi.conf").write_text(f"""\
[Distribution]
Distribution=debian
Release={s.release}
Mirror={s.mirror}
Architecture=x86-64

[Output]
Format=disk
ImageId={s.id}
ImageVersion={version}
OutputDirectory={root / "out"}
SplitArtifacts=uki,partitions
SectorSize=512
Seed=0b9d4f0c-5a43-4c52-9a1c-5c2b7bb0f2a1

[Content]
Packages={",".join(packages)}
Bootable=yes
Bootloader=systemd-boot
UnifiedKernelImages=yes
KernelCommandLine={cmdline}
WithDocs=no

[Build]
Incremental=yes
CacheDirectory={root / "cache"}
PackageCacheDirectory={pkgcache}
WorkspaceDirectory={root / "workspace"}
""")
    comp = img.compression or ("lz4hc" if img.filesystem == "erofs" else "zstd")
    usr_size = img.usr_slot_size
    parts = {
        "00-esp": f"Type=esp\nFormat=vfat\nCopyFiles=/boot:/\nCopyFiles=/efi:/\n"
                  f"SizeMinBytes={img.esp_size}\nSizeMaxBytes={img.esp_size}\n",
        "10-usr-verity": f"Type=usr-verity\nVerity=hash\nVerityMatchKey=usr\n"
                         f"SizeMinBytes={verity_size(usr_size)}\n"
                         f"SizeMaxBytes={verity_size(usr_size)}\n",
        "11-usr": f"Type=usr\nFormat={img.filesystem}\nCompression={comp}\nCopyFiles=/usr:/\n"
                  f"Verity=data\nVerityMatchKey=usr\nSizeMinBytes={usr_size}\n"
                  f"SizeMaxBytes={usr_size}\n",
        "20-usr-verity-b": f"Type=usr-verity\nLabel=_empty\nSizeMinBytes={verity_size(usr_size)}\n"
                           f"SizeMaxBytes={verity_size(usr_size)}\n",
        "21-usr-b": f"Type=usr\nLabel=_empty\nSizeMinBytes={usr_size}\nSizeMaxBytes={usr_size}\n",
        "30-root": f"Type=root\nFormat=ext4\nCopyFiles=/:/\nExcludeFiles=/usr/\n"
                   f"SizeMinBytes={img.root_size}\nSizeMaxBytes={img.root_size}\n",
    }
    for name, body in parts.items():
        split = "" if name == "11-usr" else "SplitName=-\n"  # split out only the /usr image
        (conf / "mkosi.repart" / f"{name}.conf").write_text("[Partition]\n" + body + split)
    # Only the release's main suite, as our mmdebstrap uses (mkosi would add -updates,
    # -security and -debug; the debug archive is not mirrored here): a sandbox tree's
    # sources file replaces mkosi's own.
    sources = conf / "mkosi.sandbox/etc/apt/sources.list.d/mkosi.sources"
    sources.parent.mkdir(parents=True)
    sources.write_text(f"Types: deb\nURIs: {s.mirror}\nSuites: {s.release}\nComponents: main\n"
                       "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n")
    for path, entry in spec.files.entries.items():
        if entry.content is not None:
            dest = conf / "mkosi.extra" / path.lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(entry.content)
    return conf


def mkosi_tools(where: Path, mirror: str) -> ToolsTree:
    return ToolsTree(mirror, packages=MKOSI_PACKAGES, where=where / "tools",
                     marker="usr/bin/mkosi")


def run_mkosi(tools: ToolsTree, root: Path, conf: Path, pkgcache: Path, *, log: Path
              ) -> tuple[float, dict[str, float]]:
    """One `mkosi build` in the tools tree (chroot, private mount namespace, network on).
    Returns the wall time and the seconds spent in each of mkosi's steps (its "‣ Step" lines
    of the first two levels, timed as they arrive)."""
    tree = tools.ensure()
    for d in (root / "out", root / "cache", root / "workspace", pkgcache):
        d.mkdir(parents=True, exist_ok=True)
    steps: dict[str, float] = {}
    start = last = time.monotonic()
    step = "start"
    with log.open("ab") as out, subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
         _MKOSI_ENTER, "mkosi-bench", str(tree), str(root), str(conf), str(pkgcache)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    ) as proc:
        assert proc.stdout is not None
        for raw in proc.stdout:
            out.write(raw)
            line = raw.decode(errors="replace").rstrip()
            m = STEP.match(line)
            if m and not any(x in line for x in NOT_STEPS):
                now = time.monotonic()
                steps[step] = steps.get(step, 0.0) + now - last
                step, last = m.group(1).rstrip("…. "), now
        code = proc.wait()
    elapsed = time.monotonic() - start
    steps[step] = steps.get(step, 0.0) + start + elapsed - last
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise ParticleError(f"mkosi failed (exit {code}); log {log}:\n{tail}")
    return elapsed, steps


# Like particleos.tools.run_in_root (chroot in a private mount namespace), with the
# benchmark's directory bound at the same path and the resolver copied in for apt. The tree is
# first bound onto itself: mkosi's sandbox remounts "/" (MS_SLAVE), which must be a mount.
_MKOSI_ENTER = r"""
set -e
tree="$1"; root="$2"; conf="$3"; pkgcache="$4"
mount --bind "$tree" "$tree"
mount --bind /dev "$tree/dev"
mount -t proc proc "$tree/proc"
mount -t sysfs sysfs "$tree/sys"
mount -t tmpfs tmpfs "$tree/tmp"
mount -t tmpfs tmpfs "$tree/var/tmp"
mkdir -p "$tree$root" "$tree$pkgcache"
mount --bind "$root" "$tree$root"
mount --bind "$pkgcache" "$tree$pkgcache"
rm -f "$tree/etc/resolv.conf"
cp -L /etc/resolv.conf "$tree/etc/resolv.conf" 2>/dev/null || true
exec chroot "$tree" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8 HOME=/root \
    TERM=dumb mkosi --directory "$conf" --force build
"""


# --- measurement -----------------------------------------------------------------------------


@dataclass
class Figures:
    cold: float = 0.0
    nochange: list[float] = field(default_factory=list)
    plus: list[float] = field(default_factory=list)
    disk: Path | None = None
    usr: Path | None = None
    uki: Path | None = None
    boot: float | None = None
    cold_stages: dict[str, float] = field(default_factory=dict)


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def fs_size(path: Path) -> int:
    """Size of the erofs file system in `path` (its superblock's block count), else the file's
    size: mkosi's split /usr partition is padded to the slot size, our usr image is not."""
    with path.open("rb") as f:
        f.seek(1024)
        sb = f.read(40)
    if len(sb) == 40 and int.from_bytes(sb[0:4], "little") == 0xE0F5E1E2:
        return int.from_bytes(sb[36:40], "little") << sb[12]
    return path.stat().st_size


def boot_to_login(image: Path) -> float:
    """Seconds from QEMU start to `login:` on the serial console (copy-on-write snapshot)."""
    with VM(image, VMOptions(snapshot=True)) as vm:
        start = time.monotonic()
        vm.start()
        vm.expect(r"login:", timeout=BOOT_TIMEOUT)
        return time.monotonic() - start


def measure_particle(
    spec_path: Path, bench: Path, plus_pkg: str, runs: int, warm_up: bool
) -> Figures:
    """Our builds with a private PARTICLE_CACHE_DIR whose tools tree and apt archives are the
    shared ones; "cold" removes everything else in it (tree or layer caches, work)."""
    shared = cache_root()
    private = bench / "particle-cache"
    shutil.rmtree(private, ignore_errors=True)
    private.mkdir(parents=True)
    for part in ("tools", "apt-archives"):
        (shared / part).mkdir(parents=True, exist_ok=True)
        (private / part).symlink_to(shared / part)
    os.environ["PARTICLE_CACHE_DIR"] = str(private)
    base = load_spec(spec_path).packages.install
    with_pkg = f"packages.install={[*base, plus_pkg]!r}".replace("'", '"')

    def wipe() -> None:
        for entry in private.iterdir():
            if entry.name not in ("tools", "apt-archives"):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()

    counter = iter(range(1, 1000))

    stages: list[dict[str, float]] = []

    def one(overrides: list[str]) -> tuple[float, Path]:
        version = str(next(counter))
        spec = load_spec(spec_path, overrides=[f"system.version={version}", *overrides])
        out = bench / "particle-out" / version
        start = time.monotonic()
        result = build(spec, out)
        elapsed = time.monotonic() - start
        stages.append(result.timings)
        print(f"  particle build {version}: {elapsed:.1f} s, cache_hit={result.cache_hit}, "
              f"stages {result.timings}", file=sys.stderr)
        return elapsed, result.disk

    try:
        if warm_up:
            one([with_pkg])  # the apt archives get every package of both specs
            wipe()
        fig = Figures()
        fig.cold, disk = one([])
        fig.cold_stages = stages[-1]
        for _ in range(runs):
            fig.nochange.append(one([])[0])
        for i in range(runs):
            fig.plus.append(one([with_pkg])[0])
            if i + 1 < runs:
                one([])  # the base spec's state again, should a cache keep only the last build
        fig.disk = disk
        fig.usr = disk.with_name(disk.name.replace(".raw", ".usr.raw"))
        fig.uki = disk.with_suffix(".efi")
        return fig
    finally:
        os.environ.pop("PARTICLE_CACHE_DIR", None)


def measure_mkosi(
    spec_path: Path, bench: Path, plus_pkg: str, runs: int, warm_up: bool
) -> Figures:
    spec = load_spec(spec_path)
    home = cache_root() / "benchmarks" / "mkosi"
    tools = mkosi_tools(home, spec.system.mirror)
    root = bench / "mkosi"
    log = home / "last-run.log"  # outlives the run, for when mkosi fails
    log.unlink(missing_ok=True)
    pkgcache = home / "pkgcache"  # persists across runs: the "warm archives"
    base = package_list(spec)
    counter = iter(range(1, 1000))

    stages: list[dict[str, float]] = []

    def one(packages: list[str]) -> tuple[float, Path]:
        version = str(next(counter))
        conf = mkosi_config(root, spec, packages, version, pkgcache)
        shutil.rmtree(root / "out", ignore_errors=True)
        elapsed, steps = run_mkosi(tools, root, conf, pkgcache, log=log)
        stages.append(steps)
        print(f"  mkosi build {version}: {elapsed:.1f} s, steps "
              f"{ {k: round(v, 1) for k, v in steps.items()} }", file=sys.stderr)
        return elapsed, root / "out" / f"{spec.system.id}_{version}.raw"

    root.mkdir(parents=True, exist_ok=True)
    tools.ensure()
    if warm_up:
        one([*base, plus_pkg])
        shutil.rmtree(root / "cache")
    fig = Figures()
    fig.cold, disk = one(base)
    fig.cold_stages = stages[-1]
    keep = root / "kept"
    (root / "out").rename(keep)  # a rename keeps the image sparse (a copy would fill it)
    for _ in range(runs):
        fig.nochange.append(one(base)[0])
    for i in range(runs):
        fig.plus.append(one([*base, plus_pkg])[0])
        if i + 1 < runs:
            one(base)  # mkosi keeps one incremental image: back to the base spec's
    fig.disk = keep / disk.name
    fig.usr = _largest(keep, r"usr-x86-64\.[^v]*raw$|\.usr\.raw$")
    fig.uki = _largest(keep, r"\.efi$")
    return fig


def _largest(where: Path, pattern: str) -> Path | None:
    found = [p for p in where.iterdir() if re.search(pattern, p.name) and "verity" not in p.name]
    return max(found, key=lambda p: p.stat().st_size) if found else None


# --- report ----------------------------------------------------------------------------------


def row(label: str, ours: float | None, theirs: float | None, unit: str,
        fmt: Callable[[float], str] = lambda v: f"{v:.1f}") -> str:
    o = fmt(ours) + f" {unit}" if ours is not None else "-"
    t = fmt(theirs) + f" {unit}" if theirs is not None else "-"
    ratio = f"{ours / theirs:.2f}" if ours and theirs else "-"
    return f"{label:<28} {o:>14} {t:>14}   {ratio:>6}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", nargs="?", default=str(REPO / "examples/minimal"))
    parser.add_argument("--package", default="htop", help="the package added for the rebuild")
    parser.add_argument("--runs", type=int, default=3, help="runs of each rebuild (median)")
    parser.add_argument("--no-boot", action="store_true", help="skip the boot comparison")
    parser.add_argument("--no-warm-up", action="store_true",
                        help="skip the unmeasured builds that fill both package caches")
    parser.add_argument("--only", choices=("particle", "mkosi"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    ui.quiet = True
    spec = Path(args.spec)
    try:
        with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="particle-vs-mkosi-") as tmp:
            bench = Path(tmp)
            theirs = ours = None
            warm = not args.no_warm_up
            if args.only != "particle":
                theirs = measure_mkosi(spec, bench, args.package, args.runs, warm)
            if args.only != "mkosi":
                ours = measure_particle(spec, bench, args.package, args.runs, warm)
            failed = False
            if not args.no_boot:
                for name, fig in (("particle", ours), ("mkosi", theirs)):
                    if fig and fig.disk:
                        try:
                            fig.boot = boot_to_login(fig.disk)
                        except ParticleError as exc:
                            print(f"error: {name} image did not boot: {exc}", file=sys.stderr)
                            failed = True
            report(ours, theirs, args.package)
    except (ParticleError, subprocess.CalledProcessError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 1 if failed else 0


def report(ours: Figures | None, theirs: Figures | None, pkg: str) -> None:
    def med(f: Figures | None, attr: str) -> float | None:
        vals = getattr(f, attr) if f else None
        return statistics.median(vals) if vals else None

    def size(f: Figures | None, attr: str, alloc: bool = False) -> float | None:
        p = getattr(f, attr) if f else None
        if p is None or not p.exists():
            return None
        return (allocated(p) if alloc else p.stat().st_size) / 2**20

    print(f"{'(CPU shared; figures under contention)':<28} {'particle':>14} {'mkosi 25':>14}"
          f"   ours/mkosi")
    print(row("cold build", ours.cold if ours else None, theirs.cold if theirs else None, "s"))
    print(row("no-change rebuild (median)", med(ours, "nochange"), med(theirs, "nochange"), "s"))
    print(row(f"rebuild +{pkg} (median)", med(ours, "plus"), med(theirs, "plus"), "s"))
    print(row("disk image, apparent", size(ours, "disk"), size(theirs, "disk"), "MiB", fmt0))
    print(row("disk image, allocated", size(ours, "disk", True), size(theirs, "disk", True),
              "MiB", fmt0))
    def usr(f: Figures | None) -> float | None:
        return fs_size(f.usr) / 2**20 if f and f.usr and f.usr.exists() else None

    print(row("/usr file system", usr(ours), usr(theirs), "MiB"))
    print(row("UKI", size(ours, "uki"), size(theirs, "uki"), "MiB"))
    print(row("boot to login:", ours.boot if ours else None, theirs.boot if theirs else None, "s"))
    if ours and ours.cold_stages:
        print("particle cold build by stage: " + ", ".join(
            f"{k} {v:.0f} s" for k, v in ours.cold_stages.items()))
    if theirs and theirs.cold_stages:
        print("mkosi cold build by step (>= 1 s): " + ", ".join(
            f"{k} {v:.0f} s" for k, v in theirs.cold_stages.items() if v >= 1))
    if ours and ours.cold:
        plus = med(ours, "plus")
        if plus:
            print(f"particle: one-package rebuild / own cold build = {plus / ours.cold:.2f}")
    if ours and theirs:
        nc = med(ours, "nochange")
        mp = med(theirs, "nochange")
        if nc and mp:
            print(f"particle no-change rebuild / mkosi incremental rebuild = {nc / mp:.2f}")


def fmt0(v: float) -> str:
    return f"{v:.0f}"


if __name__ == "__main__":
    sys.exit(main())
