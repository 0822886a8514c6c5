"""System extension facts shared by the machine (`particle ext`) and the builder: the
extension-release fields that tie an extension to one exact base, the file names, the root hash
of an extension image and the sysupdate transfer that keeps an extension in step with the base.

Standard library only, and only the part of it that python3-minimal ships (no shutil, uuid,
tempfile, http): this module runs on the machine and is imported by the host-side builder, so
both sides agree on every name and rule.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from .. import formats
from .cli import MachineError

EXTENSIONS_DIR: Final = Path("/var/lib/extensions")  # what systemd-sysext merges
STORE_DIR: Final = Path("/var/lib/particle/extensions")  # every downloaded version
OS_RELEASE: Final = Path("/usr/lib/os-release")
RELEASE_DIR: Final = "usr/lib/extension-release.d"
MERGED_LIST: Final = Path("/usr/.systemd-sysext/extensions")  # written by systemd-sysext
TRANSFER_DIR: Final = Path("/etc/sysupdate.d")
VENDOR_TRANSFER_DIR: Final = Path("/usr/lib/sysupdate.d")
# Sorted before the base's transfers (10-...), so the extension of a new version is in place
# before the UKI that makes the version bootable is installed.
TRANSFER_PREFIX: Final = "05-particle-ext-"
NAME_RE: Final = re.compile(r"^[A-Za-z0-9-]+$")
ARCHITECTURES: Final = {"x86_64": "x86-64", "aarch64": "arm64"}

_SECTOR: Final = formats.SECTOR_SIZE


class ExtensionError(MachineError):
    """A problem with an extension image or its metadata; the message says what to do."""


def run(argv: list[str], *, verbose: bool = False) -> str:
    """Run a program; its stdout, or an ExtensionError carrying its stderr."""
    if verbose:
        print("$ " + " ".join(argv), file=sys.stderr)
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise ExtensionError(f"{argv[0]} is not installed on this machine") from None
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise ExtensionError(f"{' '.join(argv)} failed (exit status {proc.returncode})"
                             + (f":\n{detail}" if detail else ""))
    return proc.stdout


# ---------------------------------------------------------------------------- release data


def parse_release(text: str) -> dict[str, str]:
    """os-release(5) / extension-release text -> fields (quotes removed, comments skipped)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1].replace('\\"', '"').replace("\\\\", "\\")
        fields[key.strip()] = value
    return fields


def sysext_level(image_id: str, version: str) -> str:
    """SYSEXT_LEVEL of a base: its exact identity, because an extension is built against one
    exact /usr. systemd-sysext compares this field (not IMAGE_VERSION), so it is what makes
    systemd itself refuse an extension of another base. os-release(5) allows only [a-z0-9._-];
    when the identity needs mangling a short hash keeps different identities apart."""
    raw = f"{image_id}-{version}"
    level = re.sub(r"[^a-z0-9._-]", "_", raw.lower())
    if level != raw:
        level += "." + hashlib.sha256(raw.encode()).hexdigest()[:8]
    return level


def describe(fields: dict[str, str]) -> str:
    """`IMAGE_ID IMAGE_VERSION` of a base or an extension, for messages."""
    return f"{fields.get('IMAGE_ID', '?')} {fields.get('IMAGE_VERSION', '?')}"


def compatibility_problems(
    ext: dict[str, str], host: dict[str, str], arch: str | None = None
) -> list[str]:
    """Why an extension does not fit this base (empty: it fits). Stricter than systemd-sysext,
    which compares ID, SYSEXT_LEVEL (or VERSION_ID) and ARCHITECTURE only: IMAGE_ID and
    IMAGE_VERSION must match too, and the messages name both sides."""
    problems: list[str] = []
    ext_arch = ext.get("ARCHITECTURE", "")
    if arch and ext_arch and ext_arch != "_any" and ext_arch != arch:
        problems.append(f"it is for architecture {ext_arch}, this machine is {arch}")
    if ext.get("ID") == "_any":
        return problems
    if ext.get("ID") != host.get("ID"):
        problems.append(f"it is for OS {ext.get('ID') or '(none)'}, this is {host.get('ID')}")
    other_image = any(
        ext.get(key) and ext.get(key) != host.get(key) for key in ("IMAGE_ID", "IMAGE_VERSION")
    )
    if other_image:
        problems.append(f"it was built for {describe(ext)}, this machine runs {describe(host)}")
    ext_level, host_level = ext.get("SYSEXT_LEVEL"), host.get("SYSEXT_LEVEL")
    if ext_level and host_level:
        if ext_level != host_level and not other_image:
            problems.append(f"its SYSEXT_LEVEL is {ext_level}, this machine's is {host_level}")
    elif ext.get("VERSION_ID") != host.get("VERSION_ID"):
        problems.append(
            f"it is for VERSION_ID {ext.get('VERSION_ID') or '(none)'}, "
            f"this machine has {host.get('VERSION_ID')}"
        )
    return problems


def machine_architecture() -> str:
    machine = os.uname().machine
    return ARCHITECTURES.get(machine, machine)


# ---------------------------------------------------------------------------- file names


def artifact_name(image_id: str, name: str, version: str) -> str:
    """`<id>-<name>_<version>.raw`: the published and stored name of one extension version."""
    return f"{image_id}-{name}_{version}.raw"


def parse_artifact_name(filename: str, image_id: str) -> tuple[str, str] | None:
    """(name, version) of `<id>-<name>_<version>.raw`, or None for any other file name."""
    prefix = f"{image_id}-"
    if not (filename.startswith(prefix) and filename.endswith(".raw")):
        return None
    stem = filename[len(prefix) : -len(".raw")]
    name, sep, version = stem.partition("_")
    if not sep or not name or not version or not NAME_RE.match(name):
        return None
    return name, version


def hash_sidecar(image: Path) -> Path:
    """`X.usrhash` next to `X.raw`: where systemd finds the root hash of an unsigned image."""
    return image.with_name(image.name.removesuffix(".raw") + ".usrhash")


def copy_file(src: Path, dst: Path) -> str:
    """shutil.copyfile for python3-minimal (which has no shutil); returns the sha256 of what
    was copied, computed on the way (one pass over a large image, not two)."""
    h = hashlib.sha256()
    with src.open("rb") as fi, dst.open("wb") as fo:
        while chunk := fi.read(1 << 20):
            h.update(chunk)
            fo.write(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------- the image


@dataclass(frozen=True)
class ImageInfo:
    """What the GPT and the verity superblock of an extension image say."""

    root_hash: str  # hex
    usr_uuid: str  # canonical lower-case GUID text
    verity_uuid: str
    signed: bool  # has a usr-verity-sig partition


def read_image(path: Path) -> ImageInfo:
    """Root hash of an extension image, derived from its usr-verity partition, and checked
    against the partition UUIDs (which is how systemd pairs data and hash partitions).

    The root hash is the salted hash of the top hash block, which the hash partition stores
    right after its superblock. Deriving it needs no trust beyond the image file itself, which
    the caller has checked against SHA256SUMS (or a signature partition covers)."""
    try:
        parts = formats.read_gpt(path)
    except formats.GptError as err:
        raise ExtensionError(f"{path}: {err} (not an extension image)") from None
    verity = [p for p in parts if p.type == formats.USR_VERITY]
    usr = [p for p in parts if p.type == formats.USR]
    if len(verity) != 1 or len(usr) != 1:
        raise ExtensionError(
            f"{path}: not a system extension image (expected one usr and one usr-verity "
            "partition)"
        )
    with path.open("rb") as f:
        verity_uuid, start = verity[0].uuid, verity[0].start()
        f.seek(start)
        sb = f.read(_SECTOR)
        if sb[:8] != b"verity\0\0":
            raise ExtensionError(f"{path}: the usr-verity partition has no verity superblock")
        (hash_type,) = struct.unpack_from("<I", sb, 12)
        algorithm = sb[32:64].rstrip(b"\0")
        (hash_block,) = struct.unpack_from("<I", sb, 68)
        (salt_size,) = struct.unpack_from("<H", sb, 80)
        if hash_type != 1 or algorithm != b"sha256" or salt_size > 256:
            raise ExtensionError(f"{path}: unsupported verity format (want version 1, sha256)")
        salt = sb[88 : 88 + salt_size]
        f.seek(start + hash_block)  # the superblock is padded to one whole hash block
        top = f.read(hash_block)
    root = hashlib.sha256(salt + top).digest()
    usr_uuid = usr[0].uuid
    if (usr_uuid, verity_uuid) != formats.verity_partition_uuids(root):
        raise ExtensionError(
            f"{path}: partition UUIDs do not match the verity root hash (corrupt image?)"
        )
    return ImageInfo(
        root_hash=root.hex(), usr_uuid=usr_uuid, verity_uuid=verity_uuid,
        signed=any(p.type == formats.USR_VERITY_SIG for p in parts),
    )


# ---------------------------------------------------------------------------- updates


def extension_transfer(image_id: str, name: str, source_type: str, source_path: str) -> str:
    """sysupdate.d(5) transfer that downloads the extension version of each new base version
    into the store, next to the base's own transfers (same source, same @v). At boot
    `particle ext sync` points /var/lib/extensions/NAME.raw at the version of the booted base,
    so a rollback gets its own extension version back too."""
    pattern = f"{image_id}-{name}_@v.raw"
    return "\n".join([
        f"# Written by `particle ext add {name}`: the {name} extension follows the base.",
        "[Transfer]",
        "ProtectVersion=%A",
        "Verify=no",
        "",
        "[Source]",
        f"Type={source_type}",
        f"Path={source_path}",
        f"MatchPattern={pattern}",
        "",
        "[Target]",
        "Type=regular-file",
        f"Path={STORE_DIR}",
        f"MatchPattern={pattern}",
        "Mode=0444",
        "InstancesMax=3",
        "",
    ])


def transfer_path(name: str) -> Path:
    return TRANSFER_DIR / f"{TRANSFER_PREFIX}{name}.transfer"


def missing_extensions(
    available: set[str] | list[str], image_id: str, version: str, names: list[str]
) -> list[str]:
    """Installed extensions that an update source lacks for `version`: an update to that
    version is held back (sysupdate only offers versions that every transfer can fetch).
    `available` are the file names the source lists in its SHA256SUMS."""
    have = set(available)
    return [n for n in names if artifact_name(image_id, n, version) not in have]
