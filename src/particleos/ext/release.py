"""The identity an extension carries: `extension-release.NAME`, tied to one exact base."""

from __future__ import annotations

from ..machine.sysext import parse_release, sysext_level

__all__ = ["extension_release_text", "parse_release", "sysext_level"]


def extension_release_text(
    name: str, base: dict[str, str], packages: list[str], architecture: str = "x86-64",
    *, reload_manager: bool = False,
) -> str:
    """extension-release.NAME for an extension of the base whose os-release is `base`.

    systemd-sysext merges an extension only if ID and SYSEXT_LEVEL match the running base (the
    base's SYSEXT_LEVEL is its exact identity, see sysext_level()); IMAGE_ID/IMAGE_VERSION are
    what `particle ext add` compares to give a clear message first. `reload_manager` (for
    extensions that ship units or generators) sets EXTENSION_RELOAD_MANAGER, so systemd reloads
    after a merge and the units work at once; without units that reload is only a cost.
    """
    missing = [k for k in ("ID", "VERSION_ID", "IMAGE_ID", "IMAGE_VERSION") if not base.get(k)]
    if missing:
        raise ValueError(f"the base os-release lacks {', '.join(missing)}")
    level = base.get("SYSEXT_LEVEL") or sysext_level(base["IMAGE_ID"], base["IMAGE_VERSION"])
    fields = {
        "ID": base["ID"],
        "VERSION_ID": base["VERSION_ID"],
        "SYSEXT_LEVEL": level,
        "IMAGE_ID": base["IMAGE_ID"],
        "IMAGE_VERSION": base["IMAGE_VERSION"],
        "ARCHITECTURE": architecture,
        "SYSEXT_SCOPE": "system",
        **({"EXTENSION_RELOAD_MANAGER": "1"} if reload_manager else {}),
        "PARTICLE_EXTENSION": name,
        "PARTICLE_PACKAGES": " ".join(packages),
    }
    return "".join(f'{k}="{v}"\n' for k, v in fields.items())
