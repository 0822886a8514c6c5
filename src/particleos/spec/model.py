"""Typed models of `particle.toml`. They are the single source of truth for keys, defaults,
allowed values and the exported JSON Schema; the loader turns their errors into
`FILE: key.path: message` lines."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

ID_RE = re.compile(r"^[A-Za-z0-9-]+$")
# UAPI version format: alphanumerics and . ~ ^ + -, no "_" (it separates id from version in names).
VERSION_RE = re.compile(r"^[A-Za-z0-9.~^+-]+$")
UNIT_RE = re.compile(
    r"^[A-Za-z0-9:_.\\-]+(@[A-Za-z0-9:_.\\-]*)?"
    r"\.(service|socket|target|timer|path|mount|automount|swap|slice|scope|device)$"
)
PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+(:[a-z0-9-]+)?(=[A-Za-z0-9.+~:-]+)?$")
SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)
MODE_RE = re.compile(r"^0?[0-7]{3,4}$")
DURATION_RE = re.compile(r"^\s*(\d+)\s*(s|sec|min|m|h)?\s*$", re.IGNORECASE)
DURATION_UNITS = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
COMPRESSIONS = {
    "erofs": ("lz4hc", "lz4", "none"),
    "squashfs": ("zstd", "xz", "gzip", "lz4", "none"),
}


def parse_size(value: Any) -> int:
    """'2G', '512M', '64K' or a byte count -> bytes (binary units, as partition tools use)."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as \"2G\" or \"512M\"")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str) and (m := SIZE_RE.match(value)):
        n = int(m.group(1)) * SIZE_UNITS[m.group(2).upper()]
    else:
        raise ValueError(f"bad size {value!r} (allowed: a number with K, M, G or T, e.g. \"512M\")")
    if n <= 0:
        raise ValueError(f"bad size {value!r} (must be greater than zero)")
    return n


def parse_duration(value: Any) -> int:
    """'10min', '90s', '1h' or a number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as \"10min\" or \"90s\"")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str) and (m := DURATION_RE.match(value)):
        n = int(m.group(1)) * DURATION_UNITS[(m.group(2) or "").lower()]
    else:
        raise ValueError(f"bad duration {value!r} (allowed: seconds, or a number with s, min "
                         "or h, e.g. \"10min\")")
    if n <= 0:
        raise ValueError(f"bad duration {value!r} (must be greater than zero)")
    return n


def _check_id(v: str) -> str:
    if not ID_RE.match(v):
        raise ValueError(f"bad id {v!r} (allowed: letters, digits and '-')")
    return v


def _version_str(v: Any) -> Any:
    """`version = 5` and `--set system.version=5` mean the version "5": versions are strings."""
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    return v


def _check_version(v: str) -> str:
    if v != "auto" and not VERSION_RE.match(v):
        raise ValueError(
            f"bad version {v!r} (allowed: \"auto\" or letters, digits and . ~ ^ + -; no '_')"
        )
    return v


def _check_unit(v: str) -> str:
    if not UNIT_RE.match(v):
        raise ValueError(
            f"bad unit name {v!r} (allowed: NAME.service, .socket, .target, .timer, .path, "
            ".mount, ...)"
        )
    return v


def _check_package(v: str) -> str:
    if not PACKAGE_RE.match(v):
        raise ValueError(
            f"bad package name {v!r} (allowed: a Debian package name, optionally =VERSION)"
        )
    return v


def _check_mode(v: str) -> str:
    if not MODE_RE.match(v):
        raise ValueError(f"bad mode {v!r} (allowed: octal such as \"0644\" or \"0755\")")
    return v


def _check_url(v: str) -> str:
    if not re.match(r"^(https?|file)://[^\s]+$", v):
        raise ValueError(f"bad mirror {v!r} (allowed: an http://, https:// or file:// URL)")
    return v


Id = Annotated[str, AfterValidator(_check_id)]
Version = Annotated[str, BeforeValidator(_version_str), AfterValidator(_check_version)]
UnitName = Annotated[str, AfterValidator(_check_unit)]
PackageName = Annotated[str, AfterValidator(_check_package)]
Mode = Annotated[str, AfterValidator(_check_mode)]
Duration = Annotated[
    int,
    BeforeValidator(parse_duration),
    Field(json_schema_extra={"type": ["string", "integer"], "examples": ["10min", "90s"]}),
]
Size = Annotated[
    int,
    BeforeValidator(parse_size),
    Field(json_schema_extra={"type": ["string", "integer"], "examples": ["512M", "2G"]}),
]


class Model(BaseModel):
    """Strict base: unknown keys are errors (the loader adds "did you mean")."""

    model_config = ConfigDict(extra="forbid", strict=False, validate_default=True)


class System(Model):
    id: Id = Field(description="Image id: file names, partition labels, IMAGE_ID.")
    version: Version = Field("auto", description='"auto" (UTC YYYYMMDDHHMMSS) or a version.')
    distribution: Literal["debian"] = "debian"
    release: Literal["bookworm", "trixie"] = "trixie"
    mirror: Annotated[str, AfterValidator(_check_url)] = "http://deb.debian.org/debian"
    architecture: Literal["x86-64"] = "x86-64"
    hostname: str | None = None


class Packages(Model):
    install: list[PackageName] = []
    remove: list[PackageName] = []


class User(Model):
    uid: Annotated[int, Field(ge=1000, le=60000)] | None = None
    groups: list[str] = []
    password: str = Field("!", description='crypt(3) hash, or "!" for no password login.')
    ssh_keys: list[str] = []
    shell: str = "/bin/bash"

    # A field validator (not a model validator) so errors point at `users.NAME.password`.
    @field_validator("password")
    @classmethod
    def _password(cls, p: str) -> str:
        if not (p in ("!", "*", "") or p.startswith(("$", "!$"))):
            raise ValueError(
                "password must be a crypt(3) hash such as \"$y$...\", \"!\" (locked) or \"\" "
                "(no password); never a clear-text password"
            )
        return p


class Services(Model):
    enable: list[UnitName] = []
    disable: list[UnitName] = []
    mask: list[UnitName] = []


class FileEntry(Model):
    content: str | None = None
    source: str | None = None
    mode: Mode = "0644"

    @model_validator(mode="after")
    def _one_of(self) -> FileEntry:
        if (self.content is None) == (self.source is None):
            raise ValueError("give exactly one of 'content' or 'source'")
        return self


class Files(Model):
    """`[files]`: absolute paths map to file entries; `trees` lists directories copied over /."""

    model_config = ConfigDict(extra="allow")
    trees: list[str] = []
    __pydantic_extra__: dict[str, FileEntry] = Field(init=False)

    @property
    def entries(self) -> dict[str, FileEntry]:
        return dict(self.__pydantic_extra__ or {})

    @model_validator(mode="before")
    @classmethod
    def _paths(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in data:
                if key != "trees" and not key.startswith("/"):
                    raise ValueError(
                        f"bad key {key!r} "
                        "(allowed: 'trees' or an absolute path such as \"/etc/motd\")"
                    )
        return data


class Kernel(Model):
    cmdline: list[str] = []


class Image(Model):
    filesystem: Literal["erofs", "squashfs"] = "erofs"
    compression: str | None = Field(None, description="Default: lz4hc (erofs), zstd (squashfs).")
    usr_slot_size: Size = 1 << 30
    esp_size: Size = 256 << 20
    root_size: Size = 512 << 20
    layout: Literal["ab-usr"] = "ab-usr"

    # A field validator (filesystem is declared, hence validated, first) so errors point at
    # `image.compression` and are reported even when another image key is wrong too.
    @field_validator("compression")
    @classmethod
    def _compression(cls, v: str | None, info: ValidationInfo) -> str | None:
        filesystem = info.data.get("filesystem")
        if filesystem not in COMPRESSIONS:
            return v  # filesystem itself is wrong; that error is reported
        allowed = COMPRESSIONS[filesystem]
        if v is None:
            return allowed[0]
        if v not in allowed:
            raise ValueError(
                f"compression {v!r} is not available for {filesystem} "
                f"(allowed: {', '.join(allowed)})"
            )
        return v


class Signing(Model):
    """Owner keys (`particle genkey`); without them the image is built unsigned."""

    key: str | None = Field(None, description="PEM private key: signs /usr and boot binaries.")
    certificate: str | None = Field(None, description="PEM certificate of `key`.")
    openpgp_key: str | None = Field(
        None, description="OpenPGP key that signs SHA256SUMS; machines verify updates with it."
    )
    update_keys: list[str] = Field(
        [], description="More OpenPGP public keys machines accept for SHA256SUMS (rotation)."
    )


def _check_update_source(v: str | None) -> str | None:
    if v is None or re.match(r"^(https?|oci|oci\+http)://[^\s]+$", v) or \
            (v.startswith("/") and "\n" not in v):
        return v
    raise ValueError(
        f"bad update source {v!r} (allowed: an http:// or https:// URL, a registry "
        "oci://HOST[:PORT]/REPO (oci+http:// for a plain-http one), or a local directory)"
    )


class Update(Model):
    source: Annotated[str | None, AfterValidator(_check_update_source)] = Field(
        None, description="http(s) URL, an OCI registry repository oci://HOST[:PORT]/REPO "
        "(oci+http:// for plain http), or a local directory on the machine."
    )
    tries: Annotated[int, Field(ge=1, le=10)] = 3


class Boot(Model):
    """Boot assessment: a new version counts as good only once these units have succeeded."""

    assess: list[UnitName] = Field(
        [], description="Units required by boot-complete.target (must succeed for a good boot)."
    )
    on_failure: Literal["reboot", "none"] = Field(
        "reboot",
        description="A failed assessment unit reboots (the boot loader counts down the tries); "
        "reboot also makes every other failure of a boot still being tried reboot "
        "(emergency mode, a hang past trial_timeout).",
    )
    trial_timeout: Duration = Field(
        600,
        description="A boot still being tried that has not reached boot-complete.target this "
        "long after the start of the initrd, or of the real root, reboots (a failed try). "
        "Size it for the slowest healthy first boot.",
    )
    panic_reboot: Duration = Field(
        10, description="Seconds after a kernel panic before the machine reboots (panic=)."
    )
    loader: str | None = Field(
        None,
        description="A systemd-boot EFI binary to ship instead of the release's (a newer build, "
        "or one a vendor signed); signed with [signing] like the release's. Machines install a "
        "version's loader onto the ESP after its first good boot, never an older one.",
    )


class Extension(Model):
    packages: list[PackageName] = []


class Spec(Model):
    """A whole, resolved spec (includes applied)."""

    system: System
    packages: Packages = Field(default_factory=Packages)
    users: dict[Id, User] = {}
    services: Services = Field(default_factory=Services)
    files: Files = Field(default_factory=Files)
    kernel: Kernel = Field(default_factory=Kernel)
    image: Image = Field(default_factory=Image)
    signing: Signing = Field(default_factory=Signing)
    update: Update = Field(default_factory=Update)
    boot: Boot = Field(default_factory=Boot)
    extensions: dict[Id, Extension] = {}
    # Which file set a key (the loader's origin tracking), for problems found after loading.
    _origin: Any = PrivateAttr(default=None)

    def set_origins(self, where: Callable[[tuple[str | int, ...]], tuple[str, Any]]) -> None:
        self._origin = where

    def origin(self, loc: tuple[str | int, ...]) -> tuple[str, tuple[str | int, ...]]:
        """The file that set `loc` and the key path as spelled there ("particle.toml" if the
        spec was not loaded from files)."""
        if self._origin is None:
            return "particle.toml", loc
        label, path = self._origin(loc)
        return str(label), tuple(path)
