"""systemd-sysupdate transfer definitions (sysupdate.d(5)) for an `ab-usr` image, and the
names under which `particle publish` serves each artifact. Pure functions: the build writes
their text into /usr/lib/sysupdate.d, publish uses the same names, and tests check both.

Why the served names carry a partition UUID: the UKI of a version finds its /usr through
`usrhash=`, and systemd-veritysetup-generator looks the data and hash partitions up by
PARTUUID = the first and last 128 bits of the root hash. sysupdate would otherwise keep the
UUID of the slot it overwrites, so the new UKI could not find its /usr. A source MatchPattern
with `@u` makes sysupdate set the partition UUID it parsed from the file name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final
from uuid import UUID

# Directory in the image that systemd-sysupdate reads (vendor definitions, in /usr).
SYSUPDATE_DIR: Final = "usr/lib/sysupdate.d"
ESP_UKI_DIR: Final = "/EFI/Linux"
INSTANCES_MAX: Final = 2  # A/B: the running version plus the one being installed


@dataclass(frozen=True)
class Part:
    """One artifact of a version that an update carries."""

    key: str  # short name, also the transfer file's stem
    suffix: str  # file name suffix of the build output and the served file
    partition_type: str | None  # sysupdate partition type name; None: a file on the ESP
    description: str


VERITY_SIG: Final = Part(
    "usr-verity-sig", ".usr-verity-sig.raw", "usr-x86-64-verity-sig",
    "the signature of the usr root hash",
)
VERITY: Final = Part("usr-verity", ".usr-verity.raw", "usr-x86-64-verity", "the usr hash tree")
USR: Final = Part("usr", ".usr.raw", "usr-x86-64", "the usr file system")
UKI: Final = Part("uki", ".efi", None, "the unified kernel image (installed last)")


def parts(verity_sig: bool = False) -> list[Part]:
    """The artifacts of an update in installation order: sysupdate handles transfers in file
    name order, so the UKI, which makes the version bootable, comes last."""
    return [*([VERITY_SIG] if verity_sig else []), VERITY, USR, UKI]


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def served_name(
    image_id: str, version: str, part: Part, uuid: str | UUID | None = None
) -> str:
    """File name in an update directory. Partition images carry the partition UUID their
    slot must get (`ID_VERSION_UUID.usr.raw`); the UKI keeps its build name (`ID_VERSION.efi`)."""
    if part.partition_type is None:
        return f"{image_id}_{version}{part.suffix}"
    if uuid is None:
        raise ValueError(f"{part.key}: a partition artifact needs its partition UUID")
    return f"{image_id}_{version}_{uuid}{part.suffix}"


def source_pattern(image_id: str, part: Part) -> str:
    if part.partition_type is None:
        return f"{image_id}_@v{part.suffix}"
    return f"{image_id}_@v_@u{part.suffix}"


def uki_patterns(image_id: str) -> list[str]:
    """Target patterns for UKIs: the first (with boot counting) names new files; the others
    match entries that systemd-bless-boot has already marked good (and the build's own)."""
    return [f"{image_id}_@v+@l-@d.efi", f"{image_id}_@v+@l.efi", f"{image_id}_@v.efi"]


def transfer_name(index: int, part: Part) -> str:
    return f"{10 * (index + 1):02d}-{part.key}.transfer"


def transfer_text(image_id: str, part: Part, source: str, tries: int, *, verify: bool) -> str:
    """The text of one transfer file. `verify` asks sysupdate for a signed SHA256SUMS.gpg
    (http sources only); it stays off until the image carries a key to check it with."""
    if is_url(source):
        src_type, path = "url-file", source if source.endswith("/") else source + "/"
    else:
        src_type, path = "regular-file", source.rstrip("/") or "/"
    lines = [
        f"# Written by ParticleOS from [update]: {part.description}.",
        "[Transfer]",
        "ProtectVersion=%A",
        f"Verify={'yes' if verify and is_url(source) else 'no'}",
        "",
        "[Source]",
        f"Type={src_type}",
        f"Path={path}",
        f"MatchPattern={source_pattern(image_id, part)}",
        "",
        "[Target]",
    ]
    if part.partition_type is not None:
        lines += [
            "Type=partition",
            "Path=auto",
            f"MatchPattern={image_id}_@v",
            f"MatchPartitionType={part.partition_type}",
        ]
    else:
        lines += [
            "Type=regular-file",
            f"Path={ESP_UKI_DIR}",
            "PathRelativeTo=boot",
            "MatchPattern=" + " ".join(uki_patterns(image_id)),
            "Mode=0444",
            f"TriesLeft={tries}",
            "TriesDone=0",
        ]
    lines.append(f"InstancesMax={INSTANCES_MAX}")
    return "\n".join(lines) + "\n"


def transfer_files(
    image_id: str, source: str, tries: int, *, verity_sig: bool = False, verify: bool = False
) -> dict[str, str]:
    """File name -> text of every transfer file of an image, in the order sysupdate runs them."""
    return {
        transfer_name(i, part): transfer_text(image_id, part, source, tries, verify=verify)
        for i, part in enumerate(parts(verity_sig))
    }


def boot_counted_name(image_id: str, version: str, tries_left: int, tries_done: int = 0) -> str:
    """`ID_VERSION+LEFT-DONE.efi`: the name systemd-boot counts boots down with."""
    return f"{image_id}_{version}+{tries_left}-{tries_done}.efi"
