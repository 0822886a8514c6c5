"""The trust chain of a signed image, as three small stages around the existing ones:

* `install_trust` (before /usr is imaged): the owner's certificate in /usr/lib/verity.d (where
  systemd looks for userspace verity checks), the OpenPGP public keyring that update metadata
  is checked against (/usr/lib/systemd/import-pubring.gpg, replacing Debian's vendor keys), and
  a Secure Boot-signed systemd-boot (`.efi.signed`, which bootctl prefers when it updates).
  Gives `bootloader`: the systemd-boot the ESP carries (loader.ship_loader: the release's or
  the spec's `[boot] loader`, installed onto the ESP after a good boot of a later version).
* `sign_verity` (after the hash tree): the usr-verity-sig partition and the kernel command line
  that makes the kernel accept /usr only with a valid root hash signature.
* `sign_uki` (after the UKI): the UKI signed for Secure Boot. Gives `boot_uki`: the UKI shipped.

Only certificates and public keys enter the tree; the private keys are read from the spec's
paths to sign and never copied. Without `[signing]` every stage gives the unsigned results
(the tree's systemd-boot, no signature, no extra command line, the unsigned UKI).
"""

from __future__ import annotations

from pathlib import Path

from .. import openpgp, uki
from ..errors import ParticleError
from ..formats import is_oci
from ..keys import KeyPair, load_key_pair
from ..signing import (
    KERNEL_CMDLINE_MAX,
    sbsign,
    usr_signature_cmdline,
    verity_signature_partition,
)
from ..spec import Spec
from ..ui import ui
from .context import BuildContext
from .loader import ship_loader

VERITY_CERT_DIR = "usr/lib/verity.d"
IMPORT_PUBRING = "usr/lib/systemd/import-pubring.gpg"
ETC_IMPORT_PUBRING = "etc/systemd/import-pubring.gpg"  # would take precedence: removed


def key_pair(spec: Spec) -> KeyPair | None:
    """The spec's signing key pair, or None for an unsigned image (spec.checks makes sure
    key and certificate come together)."""
    s = spec.signing
    if s.key is None or s.certificate is None:
        return None
    return load_key_pair(Path(s.key), Path(s.certificate))


def verify_updates(spec: Spec) -> bool:
    """Whether the image's transfer files say `Verify=yes`: its SHA256SUMS are signed."""
    return spec.signing.openpgp_key is not None


def install_trust(ctx: BuildContext) -> None:
    assert ctx.tree is not None
    pair = key_pair(ctx.spec)
    pgp_key = ctx.spec.signing.openpgp_key
    sdboot = ctx.bootloader = ship_loader(ctx)
    if pair is None and pgp_key is None:
        # "\\[" so that rich prints "[signing]" instead of taking it for markup.
        ui.info("  unsigned image (no \\[signing] keys)")
        return
    if pair is not None:
        cert_dir = ctx.tree / VERITY_CERT_DIR
        cert_dir.mkdir(parents=True, exist_ok=True)
        (cert_dir / f"{ctx.image_id}.crt").write_bytes(pair.cert_pem)
        signed = sdboot.with_name(sdboot.name + ".signed")
        sbsign(ctx.tools, Path(ctx.spec.signing.key or ""),
               Path(ctx.spec.signing.certificate or ""), sdboot, signed)
        ctx.bootloader = signed
    if pgp_key is not None:
        source = ctx.spec.update.source
        if source and is_oci(source) and not (ctx.tree / "usr/bin/gpgv").exists():
            raise ParticleError(
                "the image has no gpgv, which `particle update` needs to verify the registry's "
                'SHA256SUMS.gpg: add "gpgv" to packages.install'
            )
        if source and not is_oci(source) and not (ctx.tree / "usr/bin/gpg").exists():
            raise ParticleError(
                "the image has no gpg, which systemd-sysupdate needs to verify SHA256SUMS.gpg: "
                'add "gpg" to packages.install'
            )
        # The signing key first, then keys trusted during a rotation; keyrings concatenate.
        ring = b"".join(openpgp.public_keyring(Path(k))
                        for k in (pgp_key, *ctx.spec.signing.update_keys))
        (ctx.tree / IMPORT_PUBRING).write_bytes(ring)
        (ctx.tree / ETC_IMPORT_PUBRING).unlink(missing_ok=True)


def sign_verity(ctx: BuildContext) -> None:
    pair = key_pair(ctx.spec)
    if pair is None:
        ctx.verity_sig = None
        ctx.usr_signature_cmdline = []
        return
    root_hash = ctx.root_hash.hex()
    sig = ctx.work_dir / "usr-verity-sig.img"
    sig.write_bytes(verity_signature_partition(pair, root_hash))
    extra = usr_signature_cmdline(pair, root_hash)
    cmdline = " ".join(
        uki.usr_cmdline(root_hash, ctx.spec.image.filesystem, [*uki.spec_cmdline(ctx.spec), *extra])
    )
    if len(cmdline) > KERNEL_CMDLINE_MAX:
        raise ParticleError(
            f"kernel.cmdline: with the /usr signature the kernel command line is {len(cmdline)} "
            f"bytes; the kernel takes at most {KERNEL_CMDLINE_MAX}: shorten kernel.cmdline"
        )
    ctx.verity_sig = sig
    ctx.usr_signature_cmdline = extra


def sign_uki(ctx: BuildContext) -> None:
    assert ctx.uki is not None
    if ctx.spec.signing.key is None:
        ctx.boot_uki = ctx.uki
        return
    signed = ctx.work_dir / "uki.signed.efi"
    sbsign(ctx.tools, Path(ctx.spec.signing.key), Path(ctx.spec.signing.certificate or ""),
           ctx.uki, signed)
    ctx.boot_uki = signed
