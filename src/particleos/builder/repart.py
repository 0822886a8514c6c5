"""The root partition's systemd-repart definition (/usr/lib/repart.d/50-root.conf): the one
place that writes it. In the initrd repart grows root to fill a disk, creates it where it is
missing (after `particle install`, or encrypted at the first boot), and deletes and recreates
it on a factory reset. Every version carries its own, in the verified /usr.

Only releases whose initrd runs repart get it: bookworm's systemd 252 has no separate
systemd-repart package, its initrd has no repart (dracut module 90particle) and its repart
does not read the FactoryReset EFI variable. A definition there would do nothing and make
`particle factory-reset` promise a reset that never happens; without one it refuses.
"""

from __future__ import annotations

from importlib import resources

from ..spec import Spec
from .bootstrap import NOT_IN_RELEASE
from .context import BuildContext
from .encryption import TPM2_PCRS

ROOT_DEFINITION = "usr/lib/repart.d/50-root.conf"
# systemd enables repart in the real root too (sysinit.target): with root mounted it has nothing
# left to do after the initrd's run, and under load it delayed udev enough that /dev/ttyS0 timed
# out in our tests.
INITRD_ONLY_DROPIN = "usr/lib/systemd/system/systemd-repart.service.d/50-particle-initrd-only.conf"
INITRD_ONLY = """[Unit]
# Written by ParticleOS: root is grown, created or reset by the initrd's run only.
ConditionPathExists=/etc/initrd-release
"""


def has_repart(spec: Spec) -> bool:
    """Whether the release's initrd runs systemd-repart (its own package, systemd >= 257)."""
    return "systemd-repart" not in NOT_IN_RELEASE.get(spec.system.release, set())


def root_definition(spec: Spec) -> str | None:
    """The definition's text: the shipped one (grow, create, factory reset), and for an
    encrypted root LUKS2 sealed to the TPM2's PCR 7 (the image leaves the free space for it,
    with no root partition). None where the release has no repart."""
    if not has_repart(spec):
        return None
    text = (resources.files("particleos") / "data" / "repart" / "50-root.conf").read_text()
    if spec.image.encrypt == "tpm2":
        text += ("# image.encrypt: made at the first boot as LUKS2, sealed to the TPM2 "
                 "(a factory reset makes a new volume key).\n"
                 f"Encrypt=tpm2\nTPM2PCRs={TPM2_PCRS}\n")
    return text


def root_partition(ctx: BuildContext) -> None:
    """Stage: the root definition (none where the release has no repart) and the drop-in that
    keeps repart to the initrd."""
    assert ctx.tree is not None
    text = root_definition(ctx.spec)
    files = {INITRD_ONLY_DROPIN: INITRD_ONLY} | ({} if text is None else {ROOT_DEFINITION: text})
    for path, content in files.items():
        target = ctx.tree / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)
