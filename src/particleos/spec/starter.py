"""`particle init`: a commented starter spec, so a new user learns every key by reading one file
instead of the documentation, and starts from something that validates and builds."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import ParticleError
from .model import ID_RE

STARTER = """\
# ParticleOS spec: everything the image contains, in one file.
#   particle validate     check this file (every problem is reported with file and key)
#   particle summary      show the fully resolved spec (includes, profiles and --set applied)
#   particle schema       JSON Schema of this file, for editors (e.g. taplo / Even Better TOML)
# Override any key for one run: particle build --set system.version=5
# Apply a profile from profiles/: particle build --profile debug

# Other files merged before this one (paths relative to this file). Tables merge key by key,
# lists are appended without duplicates, and for single values the later file wins.
# include = ["base.toml"]

[system]
id = "{id}"                      # image id: file names, partition labels, IMAGE_ID= (A-Z a-z 0-9 -)
version = "auto"                 # "auto" = UTC time YYYYMMDDHHMMSS at build time, or e.g. "1.2"
distribution = "debian"
release = "trixie"               # trixie | bookworm
mirror = "http://deb.debian.org/debian"
architecture = "x86-64"
# hostname = "{id}"              # default: set by systemd at first boot

[packages]
# Extra Debian packages; the builder already installs systemd, the kernel, the boot loader and
# the update tools. Pin a version with "name=VERSION".
install = ["less"]
remove = []

# One table per user. password is a crypt(3) hash (mkpasswd -m yescrypt), "!" (locked: log in
# with an ssh key or from the console as root only) or "" (no password). Never clear text.
[users.admin]
groups = ["sudo"]
password = "!"
ssh_keys = []                    # e.g. ["ssh-ed25519 AAAA... you@laptop"]
# uid = 1000                     # default: the next free uid
# shell = "/bin/bash"

[services]
enable = ["systemd-networkd.service"]
disable = []
mask = []

# Files placed into the image: absolute path = {{ content = "..." }} or {{ source = "local/file" }}
# (paths relative to this file), optionally with mode = "0755".
[files]
"/etc/motd" = {{ content = "Welcome to {id}, built by ParticleOS.\\n" }}
# "/etc/ssh/sshd_config.d/local.conf" = {{ source = "files/sshd.conf", mode = "0644" }}
# trees = ["overlay/"]           # directories copied over / (relative to this file)

[kernel]
cmdline = ["console=ttyS0,115200"]   # serial console: handy under QEMU (particle qemu)

[image]
filesystem = "erofs"             # erofs | squashfs: the read-only, dm-verity protected /usr
# compression = "lz4hc"          # erofs: lz4hc|lz4|none; squashfs: zstd|xz|gzip|lz4|none
usr_slot_size = "1G"             # each of the two /usr slots (A and B); sizes: 512M, 2G, ...
esp_size = "256M"                # EFI system partition (boot loader and unified kernel images)
root_size = "512M"               # writable root partition (grown to fill the disk at first boot)
layout = "ab-usr"

# Secure Boot and dm-verity signing. `particle genkey` writes a key and a certificate; without
# this section the image is built unsigned (fine for testing).
# [signing]
# key = "keys/particle.key"
# certificate = "keys/particle.crt"
# openpgp_key = "keys/particle-openpgp.asc"   # signs SHA256SUMS; machines verify updates

[update]
# source = "https://updates.example.org/{id}/"   # or a local directory, for tests
tries = 3                        # boot attempts of a new version before falling back to the old

# Boot assessment: a new version counts as good (and stays) once these units have succeeded;
# a failing one reboots, and after `tries` failed boots the previous version comes back.
# [boot]
# assess = ["my-health-check.service"]
# on_failure = "reboot"          # reboot | none: any failure of a boot being tried reboots
# trial_timeout = "10min"        # a boot being tried that hangs this long reboots
# panic_reboot = "10s"           # a panicked kernel reboots after this (panic=)
# loader = "systemd-bootx64.efi"  # ship this systemd-boot instead of the release's

# System extensions (sysext) built against exactly this /usr, e.g. developer tools.
# [extensions.devtools]
# packages = ["gcc", "make"]
"""

DEBUG_PROFILE = """\
# Debug profile: particle build --profile debug
# Merged after particle.toml: these lists are appended to the spec's lists.

[packages]
install = ["strace", "less"]

[kernel]
cmdline = ["systemd.log_level=debug"]
"""


def default_id(directory: Path) -> str:
    """The directory name with anything outside [A-Za-z0-9-] turned into '-'."""
    name = re.sub(r"[^A-Za-z0-9-]+", "-", directory.resolve().name).strip("-")
    return name or "particle"


def write_starter(directory: Path, image_id: str | None) -> list[Path]:
    """Write particle.toml and profiles/debug.toml into `directory`; never overwrite anything."""
    image_id = image_id if image_id is not None else default_id(directory)
    if not ID_RE.match(image_id):
        raise ParticleError(f"bad id {image_id!r} (allowed: letters, digits and '-')")
    files = {
        directory / "particle.toml": STARTER.format(id=image_id),
        directory / "profiles" / "debug.toml": DEBUG_PROFILE,
    }
    existing = [str(p) for p in files if p.exists()]
    if existing:
        raise ParticleError(f"refusing to overwrite existing {', '.join(existing)}")
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return list(files)
