"""Stage 1: the Debian root tree from the mirror (mmdebstrap), with the kernel and an initrd
that can verity-mount /usr. The finished tree is cached under a key made of everything that
decides it, so an unchanged rebuild copies it instead of installing packages again."""

from __future__ import annotations

import hashlib
import json
import shutil
from importlib import resources
from pathlib import Path

from .. import runner
from ..cache import atomic_dir, cache_root
from ..errors import ParticleError
from ..ui import ui
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
# Bumped whenever the way the tree is made changes, so old cache entries are not reused.
BOOTSTRAP_VERSION = "1"
DPKG_EXCLUDES = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/info/*",
)


def package_list(ctx: BuildContext) -> list[str]:
    missing = NOT_IN_RELEASE.get(ctx.spec.system.release, set())
    wanted = [p for p in BASE_PACKAGES if p not in missing]
    extra = ctx.spec.packages.install
    if not any(p.startswith("linux-image-") for p in extra):
        wanted.append(DEFAULT_KERNEL)
    if ctx.spec.signing.openpgp_key and ctx.spec.update.source:
        wanted.append("gpg")  # systemd-pull checks SHA256SUMS.gpg with it (Verify=yes)
    for p in extra:
        if p not in wanted:
            wanted.append(p)
    return wanted


def skeleton_files() -> dict[str, bytes]:
    """Files put into the tree before any package is installed: the dracut configuration and
    our dracut module, so the initrd the kernel package makes is already the right one."""
    data = resources.files("particleos") / "data" / "dracut"
    files = {"etc/dracut.conf.d/10-particle.conf": (data / "particle.conf").read_bytes()}
    for entry in (data / "90particle").iterdir():
        files[f"usr/lib/dracut/modules.d/90particle/{entry.name}"] = entry.read_bytes()
    return files


def tree_key(ctx: BuildContext) -> str:
    s = ctx.spec.system
    material = {
        "v": BOOTSTRAP_VERSION,
        "release": s.release,
        "mirror": s.mirror,
        "arch": s.architecture,
        "packages": package_list(ctx),
        "remove": ctx.spec.packages.remove,
        "skeleton": {k: hashlib.sha256(v).hexdigest() for k, v in skeleton_files().items()},
        "dpkg": DPKG_EXCLUDES,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:20]


def bootstrap(ctx: BuildContext) -> None:
    """Copy the cached tree for this key into the work directory, making it first if needed."""
    key = tree_key(ctx)
    cached = cache_root() / "trees" / f"{ctx.spec.system.release}-{key}"
    ctx.tree_key = key
    ctx.cache_hit = (cached / "usr").is_dir()
    if ctx.cache_hit:
        ui.info(f"  bootstrap: cache hit ({cached.name})")
    else:
        _make_tree(ctx, cached)
    ctx.tree = ctx.work_dir / "root"
    runner.run(["cp", "-a", "--reflink=auto", str(cached), str(ctx.tree)], what="copy of the tree")
    kernels = sorted(p.name for p in (ctx.tree / "usr/lib/modules").iterdir())
    if not kernels:
        raise ParticleError(
            "the tree has no kernel in /usr/lib/modules: add a linux-image package to "
            "packages.install"
        )
    ctx.kernel_version = kernels[-1]


def _make_tree(ctx: BuildContext, cached: Path) -> None:
    s = ctx.spec.system
    skel = ctx.work_dir / "skeleton"
    for rel, data in skeleton_files().items():
        path = skel / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if rel.endswith(".sh"):
            path.chmod(0o755)
    archives = cache_root() / "apt-archives" / s.release
    archives.mkdir(parents=True, exist_ok=True)
    remove = ctx.spec.packages.remove
    customize = [
        # The kernel package's hook made the initrd with our configuration; make sure.
        'for k in "$1"/usr/lib/modules/*; do v=$(basename "$k"); '
        '[ -e "$1/boot/initrd.img-$v" ] || chroot "$1" dracut --force --kver "$v" '
        '"/boot/initrd.img-$v"; done',
    ]
    if remove:
        customize.insert(
            0,
            'chroot "$1" apt-get purge -y --allow-remove-essential ' + " ".join(remove),
        )
    argv: list[str] = [
        "mmdebstrap", "--mode=root", "--variant=apt", "--format=directory",
        f"--architectures={'amd64' if s.architecture == 'x86-64' else s.architecture}",
        "--include=" + ",".join(package_list(ctx)),
        *[f"--dpkgopt={o}" for o in DPKG_EXCLUDES],
        "--aptopt=Acquire::Retries \"3\"",
        "--skip=download/empty",
        f"--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives && cp -a {archives}/. "
        "\"$1\"/var/cache/apt/archives/ && cp -a " + str(skel) + "/. \"$1\"/",
        *[f"--customize-hook={c}" for c in customize],
        f"--customize-hook=cp -a --no-clobber \"$1\"/var/cache/apt/archives/*.deb {archives}/ "
        "2>/dev/null || true",
    ]
    with ui.step(f"Installing {len(package_list(ctx))} packages from {s.release} (mmdebstrap)"), \
            atomic_dir(cached) as tmp:
        runner.run([*argv, s.release, str(tmp), s.mirror], what="mmdebstrap")
        # mmdebstrap cleans the archive cache itself once the hooks ran; nothing else to do.
    shutil.rmtree(skel, ignore_errors=True)
