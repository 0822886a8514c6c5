"""`particle push`: one built version as an OCI artifact in a registry.

The artifact is an OCI 1.1 image manifest with `artifactType` and the empty config; each file
of the version (what `particle publish` serves) is one layer with its own media type and its
served name in `org.opencontainers.image.title` (so `oras pull` writes the same files a static
update directory has, partition UUIDs included). The version's SHA256SUMS (served name ->
SHA-256) travels as a layer too, with its OpenPGP signature when a key is given: a SHA-256 of a
file is its blob digest, so a machine that checks the signed index against the owner's key can
check every blob it downloads against it; the registry, the tags and the manifest need no
trust.

Blobs the registry already has (HEAD answers 200) are not uploaded again: a version that
shares its UKI or an extension with the previous one uploads only what changed.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from ..errors import ParticleError
from ..formats import (
    OCI_ARTIFACT_TYPE,
    OCI_ID,
    OCI_TITLE,
    OCI_VERSION,
    SHA256SUMS,
    SIGNATURE,
    Manifest,
    format_sha256sums,
    oci_version_tag,
    read_sha256sums,
    sha256_file,
)
from ..ui import ui
from ..update.publish import Signer, find_version
from .registry import MANIFEST_V1, Credentials, Reference, Registry

EMPTY_CONFIG: Final = "application/vnd.oci.empty.v1+json"
EMPTY_DATA: Final = b"{}"
SUMS_TYPE: Final = "application/vnd.particleos.sha256sums.v1"
SUMS_SIG_TYPE: Final = "application/pgp-signature"
PREFIX: Final = "org.particleos."

# Suffix of a served file name -> media type ({fs}: the usr file system of the build).
MEDIA_TYPES: Final = (
    (".usr-verity-sig.raw", "application/vnd.particleos.usr-verity-sig.v1+json"),
    (".usr-verity.raw", "application/vnd.particleos.usr-verity.v1"),
    (".usr.raw", "application/vnd.particleos.usr.{fs}.v1"),
    (".efi", "application/vnd.particleos.uki.v1"),
    (".manifest.json", "application/vnd.particleos.manifest.v1+json"),
)
SYSEXT_TYPE: Final = "application/vnd.particleos.sysext.v1"


@dataclass(frozen=True)
class Blob:
    name: str  # served name (the title annotation)
    media_type: str
    digest: str  # sha256:<hex>
    size: int
    path: Path | None = None  # a file of the build, or
    data: bytes | None = None  # small content made here (index, signature, config)

    def descriptor(self) -> dict[str, Any]:
        d: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest,
                             "size": self.size}
        if self.name:
            d["annotations"] = {OCI_TITLE: self.name}
        return d


@dataclass
class PushResult:
    image_id: str
    version: str
    repository: str  # registry/repo
    digest: str = ""  # of the manifest
    tags: list[str] = field(default_factory=list)
    uploaded: list[str] = field(default_factory=list)  # blob names sent
    skipped: list[str] = field(default_factory=list)  # blob names the registry had
    uploaded_bytes: int = 0
    skipped_bytes: int = 0
    signed: bool = False

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "uploaded_blobs": len(self.uploaded),
                "skipped_blobs": len(self.skipped)}


def media_type(name: str, manifest: Manifest) -> str:
    for suffix, mtype in MEDIA_TYPES:
        if name.endswith(suffix):
            return mtype.format(fs=manifest.usr_filesystem or "erofs")
    return SYSEXT_TYPE


def version_blobs(build_dir: Path, version: str | None, sign: Signer | None) \
        -> tuple[Manifest, list[Blob]]:
    """The layers of a version: its files in install order, then SHA256SUMS (+ signature)."""
    built = find_version(build_dir, version)
    manifest_path = next(p for n, p in built.files.items() if n.endswith(".manifest.json"))
    manifest = Manifest.read(manifest_path)
    build_sums = read_sha256sums(build_dir / SHA256SUMS)
    blobs: list[Blob] = []
    for name, path in built.files.items():
        digest = sha256_file(path)
        expected = build_sums.get(path.name)
        if expected is not None and expected != digest:
            raise ParticleError(
                f"{path}: its SHA256 does not match the build's SHA256SUMS (corrupted output?)"
            )
        blobs.append(Blob(name, media_type(name, manifest), f"sha256:{digest}",
                          path.stat().st_size, path=path))
    index = format_sha256sums({b.name: b.digest.removeprefix("sha256:") for b in blobs})
    blobs.append(_small(SHA256SUMS, SUMS_TYPE, index.encode()))
    if sign is not None:
        with tempfile.TemporaryDirectory(prefix="particle-push-") as tmp:
            index_file = Path(tmp) / SHA256SUMS
            index_file.write_text(index)
            sign(index_file)
            sig = index_file.with_name(SIGNATURE)
            if not sig.is_file():
                raise ParticleError(f"the signer did not write {sig.name}")
            blobs.append(_small(SIGNATURE, SUMS_SIG_TYPE, sig.read_bytes()))
    return manifest, blobs


def _small(name: str, mtype: str, data: bytes) -> Blob:
    return Blob(name, mtype, "sha256:" + hashlib.sha256(data).hexdigest(), len(data), data=data)


def image_manifest(manifest: Manifest, blobs: list[Blob]) -> bytes:
    """The OCI manifest (deterministic bytes: the same version gives the same digest)."""
    config = _small("", EMPTY_CONFIG, EMPTY_DATA)
    doc = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_V1,
        "artifactType": OCI_ARTIFACT_TYPE,
        "config": {"mediaType": EMPTY_CONFIG, "digest": config.digest, "size": config.size,
                   "data": "e30="},
        "layers": [b.descriptor() for b in blobs],
        "annotations": {
            OCI_VERSION: manifest.version,
            OCI_ID: manifest.id,
            f"{PREFIX}root-hash": manifest.root_hash,
            f"{PREFIX}release": manifest.release,
            f"{PREFIX}architecture": manifest.architecture,
        },
    }
    return json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n"


def upload(registry: Registry, blobs: list[Blob], result: PushResult) -> None:
    """Every blob the registry does not have yet; counts what was sent and what was not."""
    for blob in blobs:
        label = blob.name or blob.media_type
        if registry.has_blob(blob.digest):
            result.skipped.append(label)
            result.skipped_bytes += blob.size
            ui.debug(f"  {label}: already in the registry")
            continue
        path = blob.path
        body: Callable[[], Any] | bytes = (lambda p=path: p.open("rb")) if path is not None \
            else (blob.data or b"")
        ui.info(f"  uploading {label} ({blob.size} bytes)")
        registry.upload_blob(blob.digest, blob.size, body)
        result.uploaded.append(label)
        result.uploaded_bytes += blob.size


def push(
    build_dir: Path,
    target: str,
    *,
    version: str | None = None,
    sign: Signer | None = None,
    credentials: Credentials | None = None,
    insecure: bool = False,
    moving_tag: str | None = "latest",
) -> PushResult:
    """Upload one built version to `target` (REGISTRY/REPO[:TAG]) and tag it with its version
    and a moving tag (the TAG of `target`, else `moving_tag`)."""
    ref = Reference.parse(target)
    manifest, blobs = version_blobs(build_dir, version, sign)
    registry = Registry(ref, credentials=credentials, insecure=insecure, push=True)
    result = PushResult(manifest.id, manifest.version, f"{ref.registry}/{ref.repository}",
                        signed=sign is not None)
    config = _small("", EMPTY_CONFIG, EMPTY_DATA)
    upload(registry, [config, *blobs], result)
    body = image_manifest(manifest, blobs)
    tags = [oci_version_tag(manifest.version)]
    if (moving := ref.tag or moving_tag) and moving not in tags:
        tags.append(moving)
    for tag in tags:
        result.digest = registry.put_manifest(tag, body)
    result.tags = tags
    return result
