"""Stage 1: the Debian root tree from the mirror, with the kernel and an initrd that can
verity-mount /usr. It is made and cached in layers, so that a change costs only the layers it
touches:

1. **base** — `mmdebstrap` of what every image has (systemd, boot loader, dracut, the kernel),
   keyed by release, mirror, architecture, that package list and the mirror's package state
   (the digest of its Packages index, read from the release's tiny `InRelease`): when the
   mirror publishes new versions the base is made again. The apt package lists mmdebstrap
   resolved against are kept next to it.
2. **tree** — a copy of the base, with the spec's extra packages installed by apt against those
   same lists and `packages.remove` purged; keyed by the base and those two lists.
3. **initrd** — dracut with our configuration and module, run on the work copy of the tree;
   keyed by the tree and the dracut files, so editing the dracut module re-runs only dracut.

No initrd is made while packages are installed (INITRD=No for the kernel hooks); dracut runs
once, at the end, with our files in place. Which layers were reused is in `ctx.tree_path`,
printed by `particle build` and written into the result and the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import urllib.error
import urllib.request
from importlib import resources
from pathlib import Path

from .. import runner
from ..cache import apt_archives, cache_entry, cache_root, remove_tree, shared_apt
from ..errors import ParticleError
from ..formats import is_oci
from ..spec import Spec
from ..tools import run_in_root
from ..ui import ui
from . import encryption
from .context import BuildContext

# What every image needs, whatever the spec says: systemd as init with the pieces that boot
# a verity-protected /usr (veritysetup generator, repart, sysupdate, boot loader), a kernel,
# and dracut to make the initrd. Python runs the machine-side `particle` command.
BASE_PACKAGES = (
    "systemd",
    "systemd-sysv",
    "udev",
    "dbus",
    "kmod",
    "systemd-boot",
    "systemd-boot-efi",
    "systemd-cryptsetup",
    "systemd-repart",
    "systemd-container",
    "dracut",
    "e2fsprogs",
    "python3-minimal",
    "passwd",
)
# bookworm (systemd 252) ships repart and the cryptsetup/veritysetup generators inside the
# systemd package itself.
NOT_IN_RELEASE = {"bookworm": {"systemd-repart", "systemd-cryptsetup"}}
DEFAULT_KERNEL = "linux-image-cloud-amd64"
# Bumped whenever the way a layer is made changes, so old cache entries are not reused.
BOOTSTRAP_VERSION = "2"
DPKG_EXCLUDES = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/info/*",
)
# The kernel's and dracut's hooks honour this: no initrd while packages go in (layer 3 makes it).
NO_INITRD = {"INITRD": "No"}
APT_ENV = {
    "DEBIAN_FRONTEND": "noninteractive",
    "DEBCONF_NONINTERACTIVE_SEEN": "true",
    **NO_INITRD,
}
APT = ["apt-get", "-y", "-o", "Dpkg::Use-Pty=0", "-o", "APT::Sandbox::User=root"]
MIRROR_TIMEOUT = 15.0
# dracut's default here is `gzip -9` (the tree has no zstd): 11 s for our 56 MB initrd, of
# which 7 s compressing; -6 makes the same size (24 MB) in 6.6 s. -n: no name or time inside.
DRACUT_COMPRESS = "gzip -n -6"


def _arch(spec: Spec) -> str:
    a = spec.system.architecture
    return "amd64" if a == "x86-64" else a


def base_packages(spec: Spec) -> list[str]:
    """Layer 1's packages: the builder's base set and the kernel (the spec's if it names one)."""
    missing = NOT_IN_RELEASE.get(spec.system.release, set())
    wanted = [p for p in BASE_PACKAGES if p not in missing]
    kernels = [p for p in spec.packages.install if p.startswith("linux-image-")]
    for p in kernels or [DEFAULT_KERNEL]:
        if p not in wanted:
            wanted.append(p)
    return wanted


def extra_packages(spec: Spec) -> list[str]:
    """Layer 2's packages: the spec's own (and gpg when updates are OpenPGP-verified, libtss2
    for an encrypted root)."""
    base = set(base_packages(spec))
    wanted: list[str] = []
    source = spec.update.source or ""
    if is_oci(source):
        wanted.append("gpgv")  # `particle update` checks the registry's SHA256SUMS.gpg
        if source.startswith("oci://"):
            wanted.append("ca-certificates")  # curl's https (a Recommends, not installed)
    elif spec.signing.openpgp_key and source:
        wanted.append("gpg")  # systemd-pull checks SHA256SUMS.gpg with it (Verify=yes)
    wanted += encryption.packages(spec)  # libtss2 for repart and cryptsetup (encrypt = "tpm2")
    if spec.update.source:
        wanted.append("curl")  # the machine's HTTP client (delta chunks, registries)
    for p in spec.packages.install:
        if p not in base and p not in wanted:
            wanted.append(p)
    return wanted


def package_list(spec: Spec) -> list[str]:
    """Every package asked for: what a one-shot bootstrap of this spec would install."""
    return [*base_packages(spec), *extra_packages(spec)]


def skeleton_files() -> dict[str, bytes]:
    """Our dracut configuration and module: put into the work tree before dracut runs."""
    data = resources.files("particleos") / "data" / "dracut"
    files = {"etc/dracut.conf.d/10-particle.conf": (data / "particle.conf").read_bytes()}
    for entry in (data / "90particle").iterdir():
        files[f"usr/lib/dracut/modules.d/90particle/{entry.name}"] = entry.read_bytes()
    return files


def _digest(material: object, n: int = 20) -> str:
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:n]


def mirror_state(mirror: str, release: str, arch: str) -> str | None:
    """A digest of the mirror's Packages indexes for `arch` as its InRelease (or Release)
    lists them: it changes exactly when the mirror publishes other package versions. None
    when the mirror cannot be reached."""
    for name in ("InRelease", "Release"):
        url = f"{mirror.rstrip('/')}/dists/{release}/{name}"
        try:
            with urllib.request.urlopen(url, timeout=MIRROR_TIMEOUT) as resp:
                text = resp.read().decode(errors="replace")
        except urllib.error.HTTPError as exc:  # reached, but no such file: try the next
            ui.debug(f"mirror state: {url}: {exc}")
            continue
        except (urllib.error.URLError, OSError, ValueError) as exc:  # not reachable at all
            ui.debug(f"mirror state: {url}: {exc}")
            return None
        return release_state(text, arch)
    return None


def release_state(text: str, arch: str) -> str:
    """The Packages index lines of a Release file's SHA256 section for `arch` (and `all`),
    hashed; the whole file's digest if it lists none (then any republication counts)."""
    lines: list[str] = []
    in_sha256 = False
    for line in text.splitlines():
        if not line.startswith(" "):
            in_sha256 = line.startswith("SHA256:")
            continue
        if in_sha256 and re.search(rf"/binary-({re.escape(arch)}|all)/Packages", line):
            lines.append(line.strip())
    source = "\n".join(sorted(lines)) if lines else text
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def bootstrap(ctx: BuildContext) -> None:
    """Put the root tree for this spec into the work directory, reusing every cached layer."""
    spec = ctx.spec
    base, base_note = _ensure_base(ctx)
    extras, remove = extra_packages(spec), list(spec.packages.remove)
    tree_key = _digest({"v": BOOTSTRAP_VERSION, "base": base.name, "install": extras,
                        "remove": remove})
    cached = cache_root() / "trees" / f"{spec.system.release}-{tree_key}"
    with cache_entry(cached, lambda p: (p / "usr").is_dir()) as tmp:
        ctx.cache_hit = tmp is None
        if tmp is not None:
            _make_tree(ctx, base, tmp, extras, remove)
    if ctx.cache_hit:
        path = "tree cache hit"
        ui.debug(f"bootstrap: tree {cached}")
    else:
        what = f"{len(extras)} package{'s' if len(extras) != 1 else ''} with apt"
        if remove:
            what += f", {len(remove)} removed"
        path = (f"cold (base bootstrapped, {what})" if base_note == "made"
                else f"layered on a cached base ({what})")
    if base_note == "offline":
        path += "; mirror unreachable, cached base reused"
    ctx.tree = ctx.work_dir / "root"
    runner.run(["cp", "-a", "--reflink=auto", str(cached), str(ctx.tree)], what="copy of the tree")
    kernels = sorted(p.name for p in (ctx.tree / "usr/lib/modules").iterdir())
    if not kernels:
        raise ParticleError(
            "the tree has no kernel in /usr/lib/modules: add a linux-image package to "
            "packages.install"
        )
    ctx.kernel_version = kernels[-1]
    skeleton = skeleton_files()
    _write_files(ctx.tree, skeleton)
    ctx.tree_key = _digest({"tree": tree_key, "compress": DRACUT_COMPRESS,
                            "skeleton": {k: hashlib.sha256(v).hexdigest()
                                         for k, v in skeleton.items()}})
    if not _initrds(ctx, kernels):
        path += "; initrd made with dracut"
    ctx.tree_path = path
    ui.info(f"  bootstrap: {path}")


def base_key(spec: Spec) -> str:
    """What decides the base besides the mirror's state (which the cache name appends)."""
    s = spec.system
    return _digest({"v": BOOTSTRAP_VERSION, "release": s.release, "mirror": s.mirror,
                    "arch": s.architecture, "packages": base_packages(spec),
                    "dpkg": DPKG_EXCLUDES}, 16)


def _ensure_base(ctx: BuildContext) -> tuple[Path, str]:
    """Layer 1 for this spec: (its cache directory, "cached" | "made" | "offline")."""
    s = ctx.spec.system
    static = base_key(ctx.spec)
    bases = cache_root() / "bases"
    state = mirror_state(s.mirror, s.release, _arch(ctx.spec))
    if state is None:
        known = sorted((p for p in bases.glob(f"{s.release}-{static}-*")
                        if (p / "root/usr").is_dir()), key=lambda p: p.stat().st_mtime)
        if known:
            ui.info(f"[yellow]warning:[/yellow] the mirror {s.mirror} cannot be reached: "
                    f"reusing the newest cached base ({known[-1].name}); its package versions "
                    "may be out of date")
            return known[-1], "offline"
        state = "unknown"  # mmdebstrap below says what is wrong with the mirror
    base = bases / f"{s.release}-{static}-{state}"
    with cache_entry(base, lambda p: (p / "root/usr").is_dir()) as tmp:
        if tmp is None:
            ui.debug(f"bootstrap: base cache hit ({base.name})")
            return base, "cached"
        _make_base(ctx, tmp)
    return base, "made"


def _make_base(ctx: BuildContext, tmp: Path) -> None:
    """mmdebstrap into `tmp` (which becomes the cache entry when this succeeds)."""
    s = ctx.spec.system
    archives = apt_archives(s.release)
    packages = base_packages(ctx.spec)
    with ui.step(f"Bootstrapping the base: {len(packages)} packages from {s.release} "
                 "(mmdebstrap)"):
        tmp.mkdir()
        lists = tmp / "lists"
        argv: list[str] = [
            "mmdebstrap", "--mode=root", "--variant=apt", "--format=directory",
            f"--architectures={_arch(ctx.spec)}",
            "--include=" + ",".join(packages),
            *[f"--dpkgopt={o}" for o in DPKG_EXCLUDES],
            "--aptopt=Acquire::Retries \"3\"",
            "--skip=download/empty",
            f"--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives && cp -a {archives}/. "
            "\"$1\"/var/cache/apt/archives/",
            # The lists apt resolved the base against: layer 2 installs against the same ones.
            f"--customize-hook=mkdir -p {lists} && cp -a \"$1\"/var/lib/apt/lists/. {lists}/ "
            f"&& rm -f {lists}/lock && rm -rf {lists}/partial",
            f"--customize-hook=cp -a --no-clobber \"$1\"/var/cache/apt/archives/*.deb "
            f"{archives}/ 2>/dev/null || true",
            s.release, str(tmp / "root"), s.mirror,
        ]
        runner.run(argv, what="mmdebstrap", env=NO_INITRD)


def _make_tree(ctx: BuildContext, base: Path, tmp: Path, extras: list[str],
               remove: list[str]) -> None:
    """The base plus the spec's packages, in `tmp` (which becomes the cache entry)."""
    release = ctx.spec.system.release
    with ui.step(f"Installing {len(extras)} package(s) on the base (apt)"):
        runner.run(["cp", "-a", "--reflink=auto", str(base / "root"), str(tmp)],
                   what="copy of the base")
        lists = tmp / "var/lib/apt/lists"
        runner.run(["cp", "-a", "--reflink=auto", f"{base / 'lists'}/.", str(lists)],
                   what="copy of the package lists")
        try:
            with shared_apt(release) as binds:
                if extras:
                    run_in_root(tmp, [*APT, "install", "--no-install-recommends", *extras],
                                binds=binds, env=APT_ENV, network=True,
                                what=f"apt-get install {' '.join(extras)}")
                if remove:
                    run_in_root(tmp, [*APT, "purge", "--allow-remove-essential", *remove],
                                binds=binds, env=APT_ENV, network=False,
                                what=f"apt-get purge {' '.join(remove)}")
        finally:
            # What mmdebstrap's own clean-up leaves: no lists, no caches (layer 1's state).
            for entry in lists.iterdir():
                if entry.name not in ("lock", "partial"):
                    remove_tree(entry)
            for entry in (tmp / "var/cache/apt").glob("*.bin"):
                entry.unlink()
            # ldconfig's cache of the libraries' inode numbers and times: differs on every
            # install, so the same packages would not give the same /usr.
            (tmp / "var/cache/ldconfig/aux-cache").unlink(missing_ok=True)
        _restore_resolv_conf(base / "root", tmp)


def _restore_resolv_conf(base: Path, tree: Path) -> None:
    """run_in_root copied the host's resolver in for apt; put the base's back."""
    src, dst = base / "etc/resolv.conf", tree / "etc/resolv.conf"
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    if src.is_symlink():
        dst.symlink_to(os.readlink(src))
    elif src.exists():
        runner.run(["cp", "-a", str(src), str(dst)], what="copy of resolv.conf")


def _initrds(ctx: BuildContext, kernels: list[str]) -> bool:
    """Layer 3: the initrd of every kernel, from the cache or made with dracut in the work
    tree (which has our dracut files). True when all came from the cache."""
    assert ctx.tree is not None
    cached = cache_root() / "initrds" / ctx.tree_key
    names = [f"initrd.img-{k}" for k in kernels]
    with cache_entry(cached, lambda p: all((p / n).is_file() for n in names)) as tmp:
        if tmp is None:
            for n in names:
                runner.run(["cp", str(cached / n), str(ctx.tree / "boot" / n)],
                           what="copy of initrd")
            return True
        with ui.step("Making the initrd (dracut)"):
            tmp.mkdir()
            for k, n in zip(kernels, names, strict=True):
                run_in_root(ctx.tree, ["dracut", "-q", "--force", "--compress", DRACUT_COMPRESS,
                                       "--kver", k, f"/boot/{n}"], what=f"dracut {k}")
                runner.run(["cp", str(ctx.tree / "boot" / n), str(tmp / n)],
                           what="copy of initrd")
    return False


def _write_files(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(0o755 if rel.endswith(".sh") else 0o644)


