"""Signatures over what the machine boots: PKCS#7 over the dm-verity root hash (checked by the
kernel against its keyrings) and Authenticode signatures of EFI binaries (checked by the
firmware against db), both made with the owner's X.509 key.

The PKCS#7 form is the one the kernel's dm-verity (`root_hash_sig_key_desc`) and systemd
(repart, dissect, veritysetup) use: detached, over the root hash as lower-case hex text, SHA-256,
RSA PKCS#1 v1.5, no signed attributes (`PKCS7_DETACHED|PKCS7_NOATTR|PKCS7_BINARY` in
systemd-repart). The kernel finds the signer's key in its keyrings by issuer and serial number,
so the certificate inside the message is optional: the copy on the kernel command line leaves
it out to stay small (x86 allows 2048 bytes of command line), the verity-sig partition keeps
it, as systemd-repart writes it.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs7

from .keys import KeyPair
from .tools import ToolsTree
from .verity import verity_sig_json

# x86's COMMAND_LINE_SIZE, including the terminating NUL.
KERNEL_CMDLINE_MAX: Final = 2047


def sign_root_hash(pair: KeyPair, root_hash_hex: str, *, embed_certificate: bool = True) -> bytes:
    """DER PKCS#7 detached signature over the root hash hex string."""
    text = bytes.fromhex(root_hash_hex).hex().encode("ascii")  # canonical lower-case
    options = [
        pkcs7.PKCS7Options.DetachedSignature,
        pkcs7.PKCS7Options.Binary,
        pkcs7.PKCS7Options.NoAttributes,
    ]
    if not embed_certificate:
        options.append(pkcs7.PKCS7Options.NoCerts)
    return (
        pkcs7.PKCS7SignatureBuilder()
        .set_data(text)
        .add_signer(pair.certificate, pair.key, hashes.SHA256())
        .sign(serialization.Encoding.DER, options)
    )


def verity_signature_partition(pair: KeyPair, root_hash_hex: str) -> bytes:
    """Contents of a usr-verity-sig partition (and the `.usr-verity-sig.raw` artifact)."""
    return verity_sig_json(root_hash_hex, sign_root_hash(pair, root_hash_hex), pair.cert_der)


def usr_signature_cmdline(pair: KeyPair, root_hash_hex: str) -> list[str]:
    """Kernel command line that makes /usr acceptable only with a valid signature.

    `dm_verity.require_signatures=1` makes the kernel refuse every verity table without a root
    hash signature it can verify against its trusted keyrings (with this kernel: secondary and,
    via CONFIG_DM_VERITY_VERIFY_ROOTHASH_SIG_PLATFORM_KEYRING, the platform keyring that holds
    the firmware's db certificates). systemd-veritysetup passes the signature given in
    `systemd.verity_usr_options=root-hash-signature=base64:...` to the kernel.
    """
    sig = sign_root_hash(pair, root_hash_hex, embed_certificate=False)
    return [
        "dm_verity.require_signatures=1",
        "systemd.verity_usr_options=root-hash-signature=base64:"
        + base64.b64encode(sig).decode("ascii"),
    ]


def sbsign(tools: ToolsTree, key: Path, certificate: Path, src: Path, dst: Path) -> Path:
    """Authenticode-sign an EFI binary for Secure Boot with sbsign from the tools tree."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    tools.run(
        ["sbsign", "--key", key.resolve(), "--cert", certificate.resolve(),
         "--output", tmp.resolve(), src.resolve()],
        binds={key.resolve().parent, certificate.resolve().parent, src.resolve().parent,
               dst.resolve().parent},
        what=f"sbsign {src.name}",
    )
    os.replace(tmp, dst)
    return dst
