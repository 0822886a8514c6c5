"""UEFI firmware for QEMU (OVMF from the Debian package `ovmf`): which code/variables pair to
use, the SMM build that enforces Secure Boot, and fresh variable stores. Both `vm` (booting)
and `secureboot` (enrolling keys into a store) need these; they live here so that neither
of those modules imports the other."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Final

from .errors import ParticleError

OVMF_DIRS: Final = (Path("/usr/share/OVMF"), Path("/usr/share/ovmf"))
# 4 MiB builds first: Debian 12 and later ship them; the 2 MiB pair is the fallback.
OVMF_PAIRS: Final = (("OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd"), ("OVMF_CODE.fd", "OVMF_VARS.fd"))
SECBOOT_CODE: Final = {"OVMF_CODE_4M.fd": "OVMF_CODE_4M.secboot.fd",
                       "OVMF_CODE.fd": "OVMF_CODE.secboot.fd"}


def find_ovmf() -> tuple[Path, Path]:
    """(code, variables template) of the first complete OVMF pair on this host."""
    for d in OVMF_DIRS:
        for code, vars_ in OVMF_PAIRS:
            if (d / code).exists() and (d / vars_).exists():
                return d / code, d / vars_
    raise ParticleError("UEFI firmware (OVMF) not found; install it with: apt-get install ovmf")


def secboot_code(code: Path) -> Path:
    """The SMM-protected OVMF build that enforces Secure Boot, next to the plain one."""
    name = SECBOOT_CODE.get(code.name)
    path = code.with_name(name) if name else None
    if path is None or not path.exists():
        raise ParticleError(
            f"no Secure Boot OVMF build next to {code} (the Debian package ovmf ships "
            "OVMF_CODE_4M.secboot.fd)"
        )
    return path


def firmware_code(*, secure_boot: bool) -> Path:
    """The read-only firmware image a boot runs: plain OVMF, or its Secure Boot (SMM) build."""
    code, _ = find_ovmf()
    return secboot_code(code) if secure_boot else code


def new_vars(path: Path) -> Path:
    """A fresh variable store at `path` (a copy of OVMF's empty template), written atomically
    so an interrupted copy never leaves a store the firmware would reject."""
    _, template = find_ovmf()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        shutil.copyfile(template, tmp)
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
