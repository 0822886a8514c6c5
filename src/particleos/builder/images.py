"""Stages 6-8: dm-verity over the usr image, the UKI that pins it, and the GPT disk image with
the ESP, slot A filled, slot B empty and the root partition (or, for an encrypted root, the
free space the first boot makes it in)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from .. import disk, uki
from ..verity import format_verity, verity_uuids
from .context import BuildContext
from .hermetic import copy_boot_files


def verity(ctx: BuildContext) -> None:
    assert ctx.usr_image is not None
    out = ctx.work_dir / "usr-verity.img"
    # Deterministic salt and superblock UUID: the same /usr gives the same root hash. The salt
    # is the image's, not the version's (as repart derives it from a per-image seed): hash
    # blocks over unchanged data then stay the same between versions, and a delta update
    # fetches only the changed part of the tree (with a per-version salt: all 0.8 MiB of it).
    salt = hashlib.sha256(f"particleos-salt:{ctx.image_id}".encode()).digest()
    result = format_verity(ctx.usr_image, out, salt=salt, uuid=ctx.stable_uuid("verity-sb"))
    ctx.verity_image = out
    ctx.root_hash = result.root_hash


def boot_files(ctx: BuildContext) -> None:
    """Keep kernel and initrd before hermetic() drops /boot from the tree."""
    boot = ctx.work_dir / "boot"
    boot.mkdir(exist_ok=True)
    ctx.vmlinuz, ctx.initrd = copy_boot_files(ctx, boot)


def build_uki(ctx: BuildContext) -> None:
    assert ctx.tree is not None and ctx.vmlinuz is not None and ctx.initrd is not None
    assert ctx.usr_signature_cmdline is not None
    cmdline = uki.usr_cmdline(
        ctx.root_hash.hex(), ctx.spec.image.filesystem,
        [*uki.spec_cmdline(ctx.spec), *ctx.usr_signature_cmdline],
    )
    out = ctx.work_dir / "uki.efi"
    uki.build_uki(
        ctx.tools,
        output=out,
        linux=ctx.vmlinuz,
        initrd=ctx.initrd,
        os_release=ctx.tree / "usr/lib/os-release",
        stub=ctx.tree / "usr/lib/systemd/boot/efi/linuxx64.efi.stub",
        cmdline=cmdline,
        uname=ctx.kernel_version,
        workdir=ctx.work_dir,
    )
    ctx.uki = out


LOADER_CONF = "timeout 0\n"


def disk_image(ctx: BuildContext) -> None:
    assert ctx.bootloader is not None and ctx.boot_uki is not None
    assert ctx.usr_image is not None and ctx.verity_image is not None
    img = ctx.spec.image
    sdboot = ctx.bootloader
    loader_conf = ctx.work_dir / "loader.conf"
    loader_conf.write_text(LOADER_CONF)
    esp = ctx.work_dir / "esp.img"
    disk.make_esp(
        esp,
        img.esp_size,
        {
            "/EFI/BOOT/BOOTX64.EFI": sdboot,
            "/EFI/systemd/systemd-bootx64.efi": sdboot,
            f"/EFI/Linux/{ctx.name}.efi": ctx.boot_uki,
            "/loader/loader.conf": loader_conf,
        },
    )
    # An encrypted root is made on the machine, at its first boot (builder/encryption.py): the
    # image leaves root_size free for it, so no key ever exists outside the machine's TPM.
    encrypted = img.encrypt != "off"
    root: Path | None = None
    if not encrypted:
        root = ctx.work_dir / "root.img"
        disk.make_ext4(root, img.root_size, label="root", uuid=ctx.stable_uuid("root-fs"))
    usr_uuid, verity_uuid = verity_uuids(ctx.root_hash)
    parts = disk.ab_usr_layout(
        image_id=ctx.image_id,
        version=ctx.version,
        esp=esp,
        usr=ctx.usr_image,
        usr_verity=ctx.verity_image,
        usr_verity_sig=ctx.verity_sig,
        usr_uuid=usr_uuid,
        verity_uuid=verity_uuid,
        usr_slot_size=img.usr_slot_size,
        root=root,
        root_size=img.root_size,
        root_partition=not encrypted,
    )
    out = ctx.staging / f"{ctx.name}.raw"
    disk.write_disk(out, parts, disk_uuid=ctx.stable_uuid("disk"),
                    free_space=img.root_size if encrypted else 0)
    ctx.disk = out
