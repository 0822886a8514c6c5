"""The state one build carries from stage to stage."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..spec import Spec
from ..tools import ToolsTree


@dataclass
class BuildContext:
    """Inputs are set by the caller; each stage fills in the outputs it is responsible for."""

    spec: Spec
    version: str
    output_dir: Path
    work_dir: Path
    tools: ToolsTree
    # Filled by the stages, in order.
    tree: Path | None = None  # the root tree being built (work copy)
    tree_key: str = ""  # cache key of the bootstrapped tree
    cache_hit: bool = False  # the whole package tree came from the cache
    tree_path: str = ""  # how bootstrap made the tree: which cached layers it reused
    kernel_version: str = ""
    usr_image: Path | None = None
    verity_image: Path | None = None
    root_hash: bytes = b""
    uki: Path | None = None
    verity_sig: Path | None = None  # usr-verity-sig partition contents (signed images only)
    extra_cmdline: list[str] = field(default_factory=list)  # e.g. the /usr signature
    bootloader: Path | None = None  # signed systemd-boot (default: the tree's own)
    disk: Path | None = None
    artifacts: dict[str, Path] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    extra_artifacts: dict[str, Path] = field(default_factory=dict)  # staged, e.g. extensions
    extensions_info: dict[str, dict[str, Any]] = field(default_factory=dict)  # manifest

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
