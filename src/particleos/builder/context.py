"""The state one build carries from stage to stage."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..spec import Spec
from ..tools import ToolsTree


@dataclass
class BuildContext:
    """Inputs are set by the caller; every other field is given by exactly one stage, which
    declares it in its `gives` (pipeline.STAGES), and read only by stages that declare it in
    their `needs`. Assignments are recorded, so the pipeline can check each stage wrote what it
    declared and nothing else."""

    spec: Spec
    version: str
    output_dir: Path
    work_dir: Path
    tools: ToolsTree
    # Given by the stages, in order (the stage named in each comment).
    tree: Path | None = None  # bootstrap: the root tree being built (work copy)
    tree_key: str = ""  # bootstrap: cache key of the bootstrapped tree
    cache_hit: bool = False  # bootstrap: the whole package tree came from the cache
    tree_path: str = ""  # bootstrap: how it made the tree (which cached layers it reused)
    kernel_version: str = ""  # bootstrap
    bootloader: Path | None = None  # trust: systemd-boot for the ESP (signed, or the tree's own)
    vmlinuz: Path | None = None  # boot-files: the kernel, copied out of the tree's /boot
    initrd: Path | None = None  # boot-files: the initrd, likewise
    usr_image: Path | None = None  # usr-image: the /usr file system, padded to whole blocks
    verity_image: Path | None = None  # verity
    root_hash: bytes = b""  # verity
    verity_sig: Path | None = None  # verity-signature: usr-verity-sig contents (signed only)
    usr_signature_cmdline: list[str] | None = None  # verity-signature: [] when unsigned
    uki: Path | None = None  # uki: as ukify made it (unsigned)
    boot_uki: Path | None = None  # uki-signature: the UKI shipped (signed, or `uki` itself)
    disk: Path | None = None  # disk: in the staging directory
    extra_artifacts: dict[str, Path] | None = None  # extensions: staged sysext images by name
    extensions_info: dict[str, dict[str, Any]] | None = None  # extensions: for the manifest
    artifacts: dict[str, Path] | None = None  # artifacts: every delivered file by name
    sizes: dict[str, int] | None = None  # artifacts: bytes of each part (usr, uki, disk, ...)

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        self.__dict__.setdefault("_assigned", set()).add(name)

    def take_assigned(self) -> set[str]:
        """The fields assigned since the last call (the pipeline calls it around each stage)."""
        assigned: set[str] = self.__dict__.setdefault("_assigned", set())
        self.__dict__["_assigned"] = set()
        return assigned

    @property
    def image_id(self) -> str:
        return self.spec.system.id

    @property
    def name(self) -> str:
        """`<id>_<version>`: the stem of every artifact and the label of the usr partitions."""
        return f"{self.image_id}_{self.version}"

    @property
    def staging(self) -> Path:
        """Where outputs are assembled before they are renamed into the output directory."""
        return self.work_dir / "out"

    def stable_uuid(self, purpose: str) -> uuid.UUID:
        """A UUID that depends only on id, version and purpose: reproducible builds."""
        return uuid.uuid5(uuid.NAMESPACE_URL, f"particleos:{self.name}:{purpose}")
