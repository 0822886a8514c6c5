"""Secure Boot on the machine side of a test or `particle qemu`: firmware variables with the
owner's certificate enrolled (virt-fw-vars from python3-virt-firmware, a maintained tool, rather
than hand-made EFI signature lists), and the owner's certificate read back from a signed image.

Enrolling the certificate in db does two things: the firmware accepts boot loader and UKIs
signed with it, and the kernel loads db into its .platform keyring, which this Debian kernel's
dm-verity trusts for root hash signatures (CONFIG_DM_VERITY_VERIFY_ROOTHASH_SIG_PLATFORM_KEYRING).
So a signed image needs the certificate in db even when Secure Boot is not enforced.
"""

from __future__ import annotations

import os
import struct
import tempfile
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7

from . import runner
from .disk import PartType, read_table
from .errors import ParticleError
from .firmware import find_ovmf
from .keys import fingerprint, owner_guid
from .tools import ToolsTree

_SECTOR: Final = 512
_IMAGE_DIRECTORY_ENTRY_SECURITY: Final = 4
_WIN_CERT_TYPE_PKCS_SIGNED_DATA: Final = 0x0002


def enroll_vars(
    tools: ToolsTree, template: Path, certificate: x509.Certificate, out: Path, *, enforce: bool
) -> Path:
    """Write an OVMF variable store with `certificate` in db; with `enforce` also as PK and KEK
    and with Secure Boot switched on (user mode), so unsigned or altered binaries do not run.
    Without `enforce` the firmware stays in setup mode: nothing is enforced, but the kernel
    still finds the certificate in db for dm-verity signatures."""
    guid = str(owner_guid(certificate))
    with tempfile.TemporaryDirectory(prefix="particle-sb-") as tmpdir:
        pem = Path(tmpdir) / "owner.pem"
        pem.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        tmp_out = Path(tmpdir) / "vars.fd"
        argv: list[str | Path] = ["virt-fw-vars", "--input", template.resolve(),
                                  "--output", tmp_out, "--add-db", guid, pem]
        if enforce:
            argv += ["--set-pk", guid, pem, "--add-kek", guid, pem, "--secure-boot"]
        tools.run(argv, binds={template.resolve().parent, Path(tmpdir)}, what="virt-fw-vars")
        staged = out.with_name(f".{out.name}.tmp")  # atomic: a store is used many times
        staged.write_bytes(tmp_out.read_bytes())
        with staged.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(staged, out)
    return out


def pe_signer_certificates(data: bytes) -> list[x509.Certificate]:
    """Certificates in the Authenticode signature of a PE/COFF file ([] if unsigned)."""
    if data[:2] != b"MZ" or len(data) < 0x40:
        raise ParticleError("not a PE/COFF (EFI) binary")
    pe = struct.unpack_from("<I", data, 0x3C)[0]
    if data[pe : pe + 4] != b"PE\0\0":
        raise ParticleError("not a PE/COFF (EFI) binary")
    opt = pe + 24
    magic = struct.unpack_from("<H", data, opt)[0]
    dirs = opt + (112 if magic == 0x20B else 96)  # PE32+ or PE32
    offset, size = struct.unpack_from("<II", data, dirs + 8 * _IMAGE_DIRECTORY_ENTRY_SECURITY)
    certs: list[x509.Certificate] = []
    end = offset + size
    while size and offset + 8 <= end:
        length, _rev, ctype = struct.unpack_from("<IHH", data, offset)
        if length < 8:
            break
        if ctype == _WIN_CERT_TYPE_PKCS_SIGNED_DATA:
            certs += pkcs7.load_der_pkcs7_certificates(data[offset + 8 : offset + length])
        offset += (length + 7) // 8 * 8
    return certs


def image_certificate(image: Path) -> x509.Certificate | None:
    """The certificate that signed the boot loader in a disk image's ESP (None: unsigned)."""
    esp = next((p for p in read_table(image) if p["type"].lower() == str(PartType.ESP)), None)
    if esp is None:
        raise ParticleError(f"{image}: no EFI system partition")
    with tempfile.TemporaryDirectory(prefix="particle-esp-") as tmpdir:
        loader = Path(tmpdir) / "BOOTX64.EFI"
        runner.run(
            ["mcopy", "-n", "-i", f"{image}@@{int(esp['start']) * _SECTOR}",
             "::/EFI/BOOT/BOOTX64.EFI", loader],
            what="mcopy of the boot loader",
        )
        certs = pe_signer_certificates(loader.read_bytes())
    return certs[0] if certs else None


def firmware_vars(
    image: Path, *, secure_boot: bool, directory: Path, certificate: Path | None = None
) -> Path | None:
    """The UEFI variable store `particle qemu` boots `image` with: None (the default store) for
    an unsigned image; for a signed one the owner's certificate in db, and with `secure_boot`
    enrolled as PK/KEK/db with Secure Boot enforced. The store lives in `directory`, named by
    certificate fingerprint and mode, so a rotated key never meets a stale store."""
    if certificate is not None:
        try:
            cert = x509.load_pem_x509_certificate(certificate.read_bytes())
        except (OSError, ValueError) as err:
            raise ParticleError(f"--certificate {certificate}: not a PEM certificate ({err})") \
                from None
    else:
        found = image_certificate(image)
        if found is None:
            if secure_boot:
                raise ParticleError(
                    f"{image} is not signed: build it with [signing] keys (particle genkey) to "
                    "boot it with Secure Boot"
                )
            return None
        cert = found
    _, template = find_ovmf()
    mode = "secureboot" if secure_boot else "db"
    out = directory / f"{image.name}.efivars-{fingerprint(cert)[:12]}-{mode}.fd"
    if not out.exists():
        enroll_vars(ToolsTree(), template, cert, out, enforce=secure_boot)
    return out
