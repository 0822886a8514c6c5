"""An encrypted root sealed to the TPM2 (`[image] encrypt = "tpm2"`): the one place that
decides how the root partition is made when it is encrypted.

The image carries no root partition, only free space after slot B and a systemd-repart
definition in /usr (repart.root_definition: the plain one plus Encrypt=tpm2). At the first boot
repart (in the initrd, reading /sysusr/usr/lib/repart.d) creates the root partition there as
LUKS2 with a random volume key enrolled to the TPM2 and formats it ext4; gpt-auto finds it as a
LUKS root and systemd-cryptsetup unlocks it with `tpm2-device=auto` at every boot, without a
prompt. No key ever exists outside the machine. `/usr` stays dm-verity and is not encrypted (it
is public and verified, not secret).

PCR 7 (the Secure Boot policy: SB on or off, PK/KEK/db/dbx) is the seal: it stays the same
across A/B updates, whose new UKIs would change PCR 4 and 11 at every version (binding those
needs signed PCR policies), and it changes when Secure Boot is turned off or its keys are
replaced. The seal is first of all to this TPM: the disk moved to another machine, or booted
with a cleared TPM, does not unlock without the recovery key.

The recovery key is made once, in the real root, by `particle-recovery-key.service`
(`particle encryption recovery-key`), printed on the console or written where
`image.recovery_key` says.
"""

from __future__ import annotations

from ..machine import encryption as machine_encryption
from ..spec import Spec
from .context import BuildContext
from .units import install_unit

# What systemd dlopens for TPM2 (esys, rc, mu; esys brings sys and the device TCTI). Debian's
# names; the initrd gets them through our dracut module when they are in the tree.
TPM2_PACKAGES = ("libtss2-esys-3.0.2-0t64", "libtss2-rc0t64")
TPM2_PCRS = "7"
RECOVERY_UNIT = "particle-recovery-key.service"
# The marker `particle encryption recovery-key` leaves, on root: a new root makes a new key.
RECOVERY_DONE = str(machine_encryption.DONE)


def packages(spec: Spec) -> list[str]:
    """Packages the image needs for its encrypted root (none when `encrypt` is off)."""
    return list(TPM2_PACKAGES) if spec.image.encrypt == "tpm2" else []


def recovery_unit(spec: Spec) -> str:
    """The unit that makes the recovery key once, before anyone can log in."""
    return (
        "# Written by ParticleOS (image.encrypt): makes the encrypted root's recovery key once.\n"
        "[Unit]\n"
        "Description=Recovery key of the encrypted root\n"
        "After=local-fs.target tpm2.target\n"
        "Before=systemd-user-sessions.service\n"
        f"ConditionPathExists=!{RECOVERY_DONE}\n"
        "\n"
        "[Service]\n"
        "Type=oneshot\n"
        "RemainAfterExit=yes\n"
        f"ExecStart=/usr/bin/particle encryption recovery-key --to {spec.image.recovery_key}\n"
        "\n"
        "[Install]\n"
        "WantedBy=multi-user.target\n"
    )


def encrypted_root(ctx: BuildContext) -> None:
    """Stage: put the recovery-key unit into /usr (nothing when the root is not encrypted;
    the root definition is repart.root_partition's)."""
    assert ctx.tree is not None
    if ctx.spec.image.encrypt == "off":
        return
    install_unit(ctx.tree, RECOVERY_UNIT, recovery_unit(ctx.spec), "multi-user.target")
