"""Stage 2: apply the spec to the tree: identity (os-release), users, services, files and
trees, kernel command line. Runs on the work copy of the cached tree, so it is cheap to redo."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .. import runner
from ..errors import ParticleError
from ..machine.sysext import sysext_level
from ..spec.model import FileEntry
from .context import BuildContext

RELEASE_NUMBERS = {"bookworm": "12", "trixie": "13"}


def configure(ctx: BuildContext) -> None:
    assert ctx.tree is not None
    write_os_release(ctx)
    apply_users(ctx)
    apply_files(ctx)
    apply_services(ctx)
    hostname = ctx.spec.system.hostname or ctx.image_id
    (ctx.tree / "etc/hostname").write_text(hostname + "\n")


def os_release_text(ctx: BuildContext) -> str:
    s = ctx.spec.system
    fields = {
        "PRETTY_NAME": f"{s.id} {ctx.version} (ParticleOS, Debian {s.release})",
        "NAME": "Debian GNU/Linux",
        "ID": "debian",
        "VERSION_ID": RELEASE_NUMBERS[s.release],
        "VERSION_CODENAME": s.release,
        "IMAGE_ID": s.id,
        "IMAGE_VERSION": ctx.version,
        # Extensions carry the same level: systemd-sysext merges only those of this exact base.
        "SYSEXT_LEVEL": sysext_level(s.id, ctx.version),
        "PARTICLE_ID": s.id,
        "HOME_URL": "https://www.debian.org/",
    }
    return "".join(f'{k}="{v}"\n' for k, v in fields.items())


def write_os_release(ctx: BuildContext) -> None:
    assert ctx.tree is not None
    target = ctx.tree / "usr/lib/os-release"
    if target.is_symlink():
        target.unlink()
    target.write_text(os_release_text(ctx))
    etc = ctx.tree / "etc/os-release"
    if etc.exists() or etc.is_symlink():
        etc.unlink()
    etc.symlink_to("../usr/lib/os-release")


def chroot(ctx: BuildContext, *argv: str, what: str) -> None:
    assert ctx.tree is not None
    runner.run(["chroot", str(ctx.tree), "env", "PATH=/usr/sbin:/usr/bin", *argv], what=what)


def apply_users(ctx: BuildContext) -> None:
    """Users go into the factory /etc (passwd, shadow, group); their home directories and
    authorized keys are created at boot by tmpfiles, because /home lives on the root partition."""
    assert ctx.tree is not None
    tmpfiles: list[str] = []
    for name, user in ctx.spec.users.items():
        exists = _user_exists(ctx.tree, name)
        if exists:
            args = ["usermod"]
        else:
            args = ["useradd", "--no-create-home", "--shell", user.shell]
            if user.uid is not None:
                args += ["--uid", str(user.uid)]
        if user.groups:
            missing = [g for g in user.groups if not _group_exists(ctx.tree, g)]
            if missing:
                raise ParticleError(
                    f"users.{name}.groups: group(s) {', '.join(missing)} do not exist in the "
                    "image (add the package that creates them, or remove them)"
                )
            args += ["--groups", ",".join(user.groups)]
        args += ["--password", user.password, name]
        chroot(ctx, *args, what=f"{args[0]} {name}")
        home = "/root" if name == "root" else f"/home/{name}"
        owner = f"{name} {name}" if name != "root" else "root root"
        tmpfiles.append(f"d {home} 0700 {owner} -")
        if user.ssh_keys:
            tmpfiles.append(f"d {home}/.ssh 0700 {owner} -")
            keys = "\\n".join(k.strip() for k in user.ssh_keys)
            tmpfiles.append(f"f^ {home}/.ssh/authorized_keys 0600 {owner} - " + _b64(keys))
    if tmpfiles:
        path = ctx.tree / "usr/lib/tmpfiles.d/particle-users.conf"
        path.write_text("# Written by ParticleOS from [users]\n" + "\n".join(tmpfiles) + "\n")


def _b64(text: str) -> str:
    import base64

    return base64.b64encode(text.replace("\\n", "\n").encode() + b"\n").decode()


def _names(db: Path) -> set[str]:
    return {line.split(":", 1)[0] for line in db.read_text().splitlines()}


def _user_exists(tree: Path, name: str) -> bool:
    return name in _names(tree / "etc/passwd")


def _group_exists(tree: Path, name: str) -> bool:
    return name in _names(tree / "etc/group")


def apply_files(ctx: BuildContext) -> None:
    assert ctx.tree is not None
    for tree_dir in ctx.spec.files.trees:
        src = Path(tree_dir)  # exists and is a directory: spec.checks
        runner.run(
            ["cp", "-a", "--no-preserve=ownership", "--remove-destination", f"{src}/.",
             str(ctx.tree)],
            what=f"copy of tree {src}",
        )
    for dest, entry in ctx.spec.files.entries.items():
        write_file(ctx.tree, dest, entry)


def write_file(tree: Path, dest: str, entry: FileEntry) -> None:
    target = tree / dest.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or target.exists():
        target.unlink()
    if entry.source is not None:
        shutil.copyfile(entry.source, target)  # a readable file: spec.checks
    else:
        target.write_text(entry.content or "")
    os.chmod(target, int(entry.mode, 8))


def apply_services(ctx: BuildContext) -> None:
    """Presets record the intent (first-boot preset-all keeps it); systemctl applies it now."""
    assert ctx.tree is not None
    sv = ctx.spec.services
    lines = [f"enable {u}" for u in sv.enable] + [f"disable {u}" for u in sv.disable]
    preset = ctx.tree / "usr/lib/systemd/system-preset/10-particle.preset"
    preset.parent.mkdir(parents=True, exist_ok=True)
    preset.write_text("# Written by ParticleOS from [services]\n" + "\n".join(lines) + "\n")
    for verb, units in (("enable", sv.enable), ("disable", sv.disable), ("mask", sv.mask)):
        if units:
            runner.run(
                ["systemctl", f"--root={ctx.tree}", verb, *units],
                what=f"systemctl {verb} {' '.join(units)}",
            )
