"""Stage: what updates and boot assessment need inside the image. With `[update] source`, the
sysupdate transfer definitions go into /usr/lib/sysupdate.d; with `[boot] assess`, the units
that must succeed before systemd-bless-boot marks a boot good are wired to
boot-complete.target. Both live in /usr, so every version carries its own. Every boot that
systemd-boot counts is watched by particle-trial (in the initrd and the real root): whatever
fails in it ends in a reboot, which spends a try."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..errors import ParticleError

# The local transfers, the incoming directory and the registry source file are contracts with
# the machine (formats.py): the build writes them, `particle update` reads them.
from ..formats import INCOMING_DIR, LOCAL_SYSUPDATE_DIR, SOURCE_FILE, is_oci
from ..update.transfer import SYSUPDATE_DIR, transfer_files
from .context import BuildContext
from .trust import verify_updates
from .units import UNIT_DIR, enable, install_unit

ASSESS_DROPIN = "particle-assess.conf"
SYSUPDATE_SERVICE_DROPIN = "usr/lib/systemd/system/systemd-sysupdate.service.d/50-particle-oci.conf"
TRIAL_SCRIPT = "usr/lib/particle/particle-trial"
TRIAL_UNIT = "usr/lib/systemd/system/particle-trial.service"
TRIAL_DROPINS = {"emergency-trial.conf": "usr/lib/systemd/system/emergency.service.d",
                 "rescue-trial.conf": "usr/lib/systemd/system/rescue.service.d"}


def install_trial(ctx: BuildContext) -> None:
    """The real root's trial units and the script the initrd has too (dracut module
    90particle): static units that act only on a boot systemd-boot counts."""
    assert ctx.tree is not None
    data = resources.files("particleos") / "data"
    script = ctx.tree / TRIAL_SCRIPT
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_bytes((data / "dracut" / "90particle" / "particle-trial.sh").read_bytes())
    script.chmod(0o755)
    install_unit(ctx.tree, Path(TRIAL_UNIT).name,
                 (data / "trial" / "particle-trial.service").read_bytes(), "sysinit.target")
    for name, where in TRIAL_DROPINS.items():
        d = ctx.tree / where
        d.mkdir(parents=True, exist_ok=True)
        (d / "50-particle-trial.conf").write_bytes((data / "trial" / name).read_bytes())


def update_definitions(ctx: BuildContext) -> None:
    assert ctx.tree is not None
    update = ctx.spec.update
    if update.source:
        # No '+' in the version (boot counting uses it in UKI names): spec.checks.
        verity_sig = ctx.spec.signing.key is not None
        sets = [(LOCAL_SYSUPDATE_DIR, INCOMING_DIR, False)]  # checked by particle before install
        if is_oci(update.source):
            # sysupdate cannot speak the registry API: `particle update` fetches and verifies
            # the files, then installs them through the local transfers; it finds the source here.
            source_file = ctx.tree / SOURCE_FILE
            source_file.parent.mkdir(parents=True, exist_ok=True)
            source_file.write_text(update.source + "\n")
            # Debian's systemd-sysupdate.timer would run sysupdate without definitions, and the
            # failed unit would leave the system degraded: it has nothing to do here.
            dropin = ctx.tree / SYSUPDATE_SERVICE_DROPIN
            dropin.parent.mkdir(parents=True, exist_ok=True)
            dropin.write_text("# Written by ParticleOS: updates come from a registry "
                              "(particle update)\n[Unit]\n"
                              f"ConditionDirectoryNotEmpty=/{SYSUPDATE_DIR}\n")
        else:
            sets.insert(0, (SYSUPDATE_DIR, update.source, verify_updates(ctx.spec)))
        for where, source, verify in sets:
            target = ctx.tree / where
            target.mkdir(parents=True, exist_ok=True)
            for stale in target.glob("*.transfer"):
                stale.unlink()
            files = transfer_files(ctx.image_id, source, update.tries, verity_sig=verity_sig,
                                   verify=verify)
            for name, text in files.items():
                (target / name).write_text(text)
    assess_units(ctx)
    install_trial(ctx)


def assess_units(ctx: BuildContext) -> None:
    """Each unit in `[boot] assess` becomes a requirement of boot-complete.target and is ordered
    before it; systemd-bless-boot.service (pulled in when systemd-boot counts this boot) only
    marks the boot good once the target is reached. With on_failure = "reboot" a failing unit
    reboots the machine, so the boot loader tries again or falls back to the previous version."""
    assert ctx.tree is not None
    units_dir = ctx.tree / UNIT_DIR
    boot = ctx.spec.boot
    for unit in boot.assess:
        if not _unit_exists(ctx, unit):
            raise ParticleError(
                f"boot.assess: unit {unit} is not in the image (add it with [files] or a "
                "package, or remove it from boot.assess)"
            )
        dropin = units_dir / f"{unit}.d"
        dropin.mkdir(parents=True, exist_ok=True)
        lines = ["# Written by ParticleOS from [boot] assess", "[Unit]",
                 "Before=boot-complete.target"]
        if boot.on_failure == "reboot":
            lines.append("FailureAction=reboot")
        (dropin / ASSESS_DROPIN).write_text("\n".join(lines) + "\n")
        enable(ctx.tree, unit, "boot-complete.target", "requires")


def _unit_exists(ctx: BuildContext, unit: str) -> bool:
    assert ctx.tree is not None
    for d in ("usr/lib/systemd/system", "etc/systemd/system", "lib/systemd/system"):
        if (ctx.tree / d / unit).exists():
            return True
        if "@" in unit:
            prefix, rest = unit.split("@", 1)
            if (ctx.tree / d / f"{prefix}@.{rest.rsplit('.', 1)[-1]}").exists():
                return True
    return False
