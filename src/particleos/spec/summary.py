"""Views of a resolved spec: a human summary, the JSON Schema for editors, the build version and
a digest that build manifests record to tie an image to the exact spec it came from."""

from __future__ import annotations

import datetime
import hashlib
import json
from typing import Any

from .model import SIZE_UNITS, Spec

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def resolved_version(spec: Spec) -> str:
    """The version a build uses: "auto" becomes the UTC time as YYYYMMDDHHMMSS (sorts right)."""
    if spec.system.version == "auto":
        return datetime.datetime.now(datetime.UTC).strftime("%Y%m%d%H%M%S")
    return spec.system.version


def spec_digest(spec: Spec) -> str:
    """sha256 of the canonical JSON (sorted keys) of the resolved spec."""
    text = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def json_schema() -> dict[str, Any]:
    """The Spec schema plus the top-level `include` key, which the loader consumes itself."""
    schema = Spec.model_json_schema()
    schema["properties"] = {
        "include": {
            "type": "array",
            "items": {"type": "string"},
            "description": "Files merged before this one (paths relative to this file).",
        },
        **schema["properties"],
    }
    return {
        "$schema": SCHEMA_DIALECT,
        **schema,
        "title": "ParticleOS spec (particle.toml)",
    }


def format_size(n: int) -> str:
    """Bytes in the units a spec uses: 1073741824 -> "1G", 1610612736 -> "1.5G"."""
    for unit in ("T", "G", "M", "K"):
        size = SIZE_UNITS[unit]
        if n >= size:
            return f"{n // size}{unit}" if n % size == 0 else f"{n / size:.1f}{unit}"
    return f"{n} bytes"


def _items(values: list[str]) -> str:
    return ", ".join(values) if values else "-"


def summary_text(spec: Spec) -> str:
    """A readable overview of the resolved spec, one aspect per line."""
    s = spec.system
    version = "auto (UTC timestamp at build time)" if s.version == "auto" else s.version
    lines = [
        f"{s.id} {version}",
        f"  distribution  {s.distribution} {s.release} ({s.architecture})",
        f"  mirror        {s.mirror}",
    ]
    if s.hostname:
        lines.append(f"  hostname      {s.hostname}")
    lines.append(f"  packages      {_items(spec.packages.install)} (plus the builder's base set)")
    if spec.packages.remove:
        lines.append(f"  remove        {_items(spec.packages.remove)}")
    for name, user in spec.users.items():
        password = {"!": "locked", "*": "locked", "": "empty"}.get(user.password, "hashed")
        details = [
            f"uid {user.uid}" if user.uid is not None else "uid auto",
            f"groups {_items(user.groups)}",
            f"password {password}",
            f"{len(user.ssh_keys)} ssh key(s)",
        ]
        lines.append(f"  user          {name}: {', '.join(details)}")
    svc = spec.services
    lines.append(f"  services      enable {_items(svc.enable)}")
    if svc.disable:
        lines.append(f"                disable {_items(svc.disable)}")
    if svc.mask:
        lines.append(f"                mask {_items(svc.mask)}")
    for path, entry in spec.files.entries.items():
        what = f"from {entry.source}" if entry.source is not None else "inline content"
        lines.append(f"  file          {path} ({what}, mode {entry.mode})")
    for tree in spec.files.trees:
        lines.append(f"  tree          {tree}")
    lines.append(f"  kernel        {' '.join(spec.kernel.cmdline) or '(default command line)'}")
    img = spec.image
    lines += [
        f"  image         {img.layout}, {img.filesystem} ({img.compression})",
        f"                /usr slot {format_size(img.usr_slot_size)}, "
        f"ESP {format_size(img.esp_size)}, root {format_size(img.root_size)}"
        + (f" (encrypted, sealed to the TPM2; recovery key: {img.recovery_key})"
           if img.encrypt == "tpm2" else ""),
    ]
    if spec.signing.key or spec.signing.certificate:
        lines.append(f"  signing       key {spec.signing.key or '-'}")
        lines.append(f"                certificate {spec.signing.certificate or '-'}")
    else:
        lines.append("  signing       none (unsigned image)")
    source = spec.update.source or "(none)"
    lines.append(f"  update        source {source}, {spec.update.tries} boot tries")
    if spec.boot.assess:
        lines.append(f"  boot          assessed by {_items(spec.boot.assess)} "
                     f"(on failure: {spec.boot.on_failure})")
    for name, ext in spec.extensions.items():
        lines.append(f"  extension     {name}: {_items(ext.packages)}")
    return "\n".join(lines)
