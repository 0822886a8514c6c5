"""Every problem the spec alone decides, found before any work: files it names exist and are
readable, keys that only make sense together come together, versions and sizes can work.

The model checks each key on its own; this module checks what needs the file system or
several keys at once (mkosi's `check_inputs` is the model). `load_spec` runs it, so `validate`,
`summary` and `build` report the same problems, all at once, before a build starts; the stages
do not check these again. What needs the built tree (a unit in `boot.assess` exists, the image
has gpg) stays in its stage."""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

from ..disk.fs import FAT32_MIN_SIZE
from ..disk.layout import GPT_NAME_MAX
from ..disk.sizes import MiB, format_size
from ..formats import is_oci
from ..machine.loader import read_loader
from ..machine.registry import parse_source
from .errors import KeyPath, key_path
from .model import Spec

# Static floors: a size below them cannot hold what every image puts there.
UKI_SIZE = 35 * MiB  # a Debian kernel with its initrd, as a unified kernel image
ESP_MIN = max(2 * UKI_SIZE + 2 * MiB, FAT32_MIN_SIZE)  # A and B UKIs plus the boot loader
USR_MIN = 64 * MiB  # the smallest Debian /usr (apt, systemd, kernel modules) is ~100 MiB
ROOT_MIN = 16 * MiB  # factory /etc, /var and the file system's own metadata
LUKS2_HEADER = 16 * MiB  # what systemd-repart's LUKS2 header takes from an encrypted root
AUTO_VERSION = "YYYYMMDDHHMMSS"  # what "auto" becomes (see builder.pipeline.resolve_version)

Where = Callable[[KeyPath], tuple[str, KeyPath]]


@dataclass(frozen=True)
class Problem:
    """One problem at a key path; `hint` says what to run or change, if there is something."""

    loc: KeyPath
    text: str
    hint: str | None = None

    def line(self, where: Where) -> str:
        """`FILE: key.path: text`, naming the file that set the key (or its nearest parent)."""
        label, path = where(self.loc)
        return f"{label}: {key_path(path)}: {self.text}" if path else f"{label}: {self.text}"


def check_inputs(
    spec: Spec, version: str | None = None, invalid: Collection[str] = ()
) -> list[Problem]:
    """All problems of `spec` that need no build, in the order of the spec's sections.

    `version` is the version being built; None means the spec's own (with "auto" standing for
    a timestamp of the length resolve_version makes). `invalid` names sections that failed
    the model's own checks (the loader then passes a partial spec): checks that read them are
    skipped, the others still run, so one `validate` reports everything.
    """
    checks: list[tuple[set[str], Callable[[], list[Problem]]]] = [
        ({"files"}, lambda: _files(spec)),
        ({"signing", "update"}, lambda: _signing(spec)),
        ({"system", "update"}, lambda: _version(spec, version)),
        ({"update"}, lambda: _registry_source(spec)),
        ({"image"}, lambda: _sizes(spec)),
        ({"boot"}, lambda: _loader(spec)),
        ({"image", "system"}, lambda: _encryption(spec)),
    ]
    problems: list[Problem] = []
    for sections, check in checks:
        if not sections & set(invalid):
            problems += check()
    return problems


# --- paths ------------------------------------------------------------------------------------


def _path_problem(path: str, kind: str) -> str | None:
    """Why `path` cannot serve as a `kind` ("file" or "directory"), or None if it can."""
    p = Path(path)
    shown = _shown(path)
    if not p.exists():
        if p.is_symlink():
            return f"{shown} is a dangling symbolic link (allowed: an existing {kind})"
        return f"{shown} does not exist (allowed: an existing {kind})"
    if kind == "directory" and not p.is_dir():
        return f"{shown} is not a directory (allowed: a directory copied over /)"
    if kind == "file" and not p.is_file():
        return f"{shown} is not a regular file (allowed: a file)"
    mode = os.R_OK | (os.X_OK if kind == "directory" else 0)
    if not os.access(p, mode):
        return f"{shown} is not readable by this user (allowed: a readable {kind})"
    if kind == "file":
        try:
            with p.open("rb") as f:
                f.read(1)
        except OSError as err:
            return f"{shown} cannot be read: {err.strerror or err}"
    return None


def _shown(path: str) -> str:
    absolute = os.path.abspath(path)
    try:
        return str(Path(absolute).relative_to(Path.cwd()))
    except ValueError:
        return absolute


def _files(spec: Spec) -> list[Problem]:
    out = []
    for i, tree in enumerate(spec.files.trees):
        if (text := _path_problem(tree, "directory")) is not None:
            out.append(Problem(("files", "trees", i), text))
    for dest, entry in spec.files.entries.items():
        if entry.source is not None and (text := _path_problem(entry.source, "file")):
            out.append(Problem(("files", dest, "source"), text))
    return out


def _genkey_hint(path: str) -> str:
    return f"create keys with: particle genkey {_shown(str(Path(path).parent))}"


def _signing(spec: Spec) -> list[Problem]:
    s = spec.signing
    out = []
    for name in ("key", "certificate", "openpgp_key"):
        value = getattr(s, name)
        if value is not None and (text := _path_problem(value, "file")) is not None:
            out.append(Problem(("signing", name), text, _genkey_hint(value)))
    for i, value in enumerate(s.update_keys):
        if (text := _path_problem(value, "file")) is not None:
            out.append(Problem(("signing", "update_keys", i), text,
                               "export a public key with: gpg --export KEYID > FILE"))
    if (s.key is None) != (s.certificate is None):
        given, missing = ("key", "certificate") if s.certificate is None else ("certificate", "key")
        out.append(Problem(
            ("signing", missing),
            f"missing: signing.{given} is set (give both key and certificate, or neither for "
            "an unsigned image)",
            _genkey_hint(s.key or s.certificate or "keys/x"),
        ))
    if s.key is not None and s.openpgp_key is None and spec.update.source:
        out.append(Problem(
            ("signing", "openpgp_key"),
            "missing: required when the image is signed and [update] source is set (a signed "
            "machine must not accept unsigned updates)",
            "`particle genkey` writes one; add its openpgp_key line to [signing]",
        ))
    if s.update_keys and s.openpgp_key is None:
        out.append(Problem(
            ("signing", "update_keys"),
            "update keys are trusted in addition to signing.openpgp_key, which is not set "
            "(allowed: only together with openpgp_key)",
        ))
    return out


def _loader(spec: Spec) -> list[Problem]:
    """`[boot] loader` must be a systemd-boot binary: machines compare its LoaderInfo version
    with the ESP's before they install it."""
    path = spec.boot.loader
    if path is None:
        return []
    if (text := _path_problem(path, "file")) is not None:
        return [Problem(("boot", "loader"), text)]
    # What machines take for systemd-boot (machine/loader.py), in a PE file.
    found, data = read_loader(Path(path))
    if data[:2] != b"MZ" or not found.is_sdboot:
        return [Problem(("boot", "loader"), f"{_shown(path)} is not a systemd-boot EFI binary "
                        "(allowed: a systemd-bootx64.efi, signed or not)")]
    return []


def _registry_source(spec: Spec) -> list[Problem]:
    """An `oci://` source: a registry host and a repository name the distribution API takes
    (no tag: the machine picks the newest version among the tags), and a key to check the
    versions with: nothing a registry serves is trusted without the owner's signature."""
    source = spec.update.source
    if not source or not is_oci(source):
        return []
    out = []
    try:
        parse_source(source)
    except ValueError as err:
        out.append(Problem(("update", "source"), str(err)))
    if spec.signing.openpgp_key is None:
        out.append(Problem(
            ("signing", "openpgp_key"),
            "missing: required with an oci:// update source (the machine accepts a version "
            "from a registry only with SHA256SUMS signed by this key)",
            "`particle genkey` writes one; add its openpgp_key line to [signing]",
        ))
    return out


# --- version and names ------------------------------------------------------------------------


def _version(spec: Spec, version: str | None) -> list[Problem]:
    out = []
    v = version or spec.system.version
    shown = AUTO_VERSION if v == "auto" else v
    if v == "auto":
        v = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d%H%M%S")
    if spec.update.source and "+" in v:
        out.append(Problem(
            ("system", "version"),
            f"version {v!r} contains '+', which boot counting uses in UKI file names "
            "(NAME+LEFT-DONE.efi) (allowed with [update] source: letters, digits and . ~ ^ -)",
            "choose a version without '+'",
        ))
    if "_" in v:  # a `version` argument bypasses the model's check
        out.append(Problem(("system", "version"),
                           f"bad version {v!r} (allowed: letters, digits and . ~ ^ + -; no '_')"))
    label = f"{spec.system.id}_{shown}"
    if len(label) > GPT_NAME_MAX:
        loc: KeyPath = ("system", "id") if spec.system.version == "auto" else ("system", "version")
        out.append(Problem(
            loc,
            f"the partition label {label!r} (ID_VERSION) is {len(label)} characters "
            f"(allowed: at most {GPT_NAME_MAX}, the GPT limit)",
            "shorten system.id or system.version",
        ))
    return out


# --- sizes ------------------------------------------------------------------------------------


def _sizes(spec: Spec) -> list[Problem]:
    img = spec.image
    root_min = ROOT_MIN + (LUKS2_HEADER if img.encrypt != "off" else 0)
    root_why = "the root partition holds the factory /etc and /var" + (
        f" and, encrypted, a {format_size(LUKS2_HEADER)} LUKS2 header" if img.encrypt != "off"
        else "")
    floors = [
        ("esp_size", img.esp_size, ESP_MIN,
         f"the ESP holds two unified kernel images of ~{format_size(UKI_SIZE)} (A and B) and "
         "the boot loader"),
        ("usr_slot_size", img.usr_slot_size, USR_MIN,
         "a /usr slot holds a compressed Debian /usr, ~100 MiB for a minimal image"),
        ("root_size", img.root_size, root_min, root_why),
    ]
    out = []
    for name, size, floor, why in floors:
        if size < floor:
            out.append(Problem(
                ("image", name),
                f"{format_size(size)} is too small: {why} (allowed: at least "
                f"{format_size(floor)})",
                f"set image.{name} = \"{floor // MiB}M\" or more",
            ))
    return out


# --- encryption -------------------------------------------------------------------------------


def _encryption(spec: Spec) -> list[Problem]:
    img = spec.image
    out = []
    key = img.recovery_key
    if key != "console" and not (key.startswith("/") and "\n" not in key
                                 and not key.endswith("/") and "/../" not in key + "/"):
        out.append(Problem(
            ("image", "recovery_key"),
            f"bad recovery key destination {key!r} (allowed: \"console\" or an absolute file "
            "path on the machine)",
        ))
    elif key != "console" and (any(c.isspace() for c in key) or "%" in key):
        # It goes into the unit's ExecStart=, which systemd splits at spaces and expands % in.
        out.append(Problem(
            ("image", "recovery_key"),
            f"recovery key destination {key!r} has a space or a '%' (allowed: a path without "
            "either: systemd would split or expand it in the recovery-key unit's ExecStart=)",
            "choose a path without spaces and '%', e.g. \"/efi/recovery-key.txt\"",
        ))
    elif key != "console" and img.encrypt == "off":
        out.append(Problem(
            ("image", "recovery_key"),
            "a recovery key is only made for an encrypted root, and image.encrypt is \"off\" "
            "(allowed: only with encrypt = \"tpm2\")",
            'set image.encrypt = "tpm2", or remove image.recovery_key',
        ))
    if img.encrypt == "tpm2" and spec.system.release == "bookworm":
        out.append(Problem(
            ("image", "encrypt"),
            "an encrypted root needs systemd 257's repart and cryptenroll, which bookworm "
            "(systemd 252) lacks (allowed with release = \"trixie\")",
            'set system.release = "trixie", or image.encrypt = "off"',
        ))
    return out
