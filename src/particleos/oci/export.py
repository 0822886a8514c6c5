"""`particle oci export`: a build's system tree as an OCI container image, so that `podman run`
runs the system's programs (tests and CI of the OS content without a VM).

The tree is the one a machine boots: the build's usr image unpacked (the exact /usr, with the
factory /etc and /var it carries) plus the merged-/usr links; one gzip layer, made by GNU tar
(owners, modes and extended attributes such as file capabilities kept). Written as an OCI image
layout directory (`--output`, what `skopeo copy oci:DIR ...` and `podman load` read) or pushed
to a registry (`--to`) with the same client as `particle push`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from .. import runner
from ..cache import atomic_dir, cache_root, fsync_path, work_dir
from ..errors import ParticleError
from ..ext.base import extract_usr, find_base, root_from_usr
from ..ext.cli import DEFAULT_MIRROR
from ..formats import Manifest, oci_version_tag
from ..runner import interruptible
from ..tools import ToolsTree
from ..ui import ui
from .artifact import Blob, PushResult, upload
from .registry import MANIFEST_V1, Credentials, Reference, Registry

CONFIG_TYPE: Final = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE: Final = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME: Final = "org.opencontainers.image.ref.name"
PATH_ENV: Final = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
GOARCH: Final = {"x86-64": "amd64", "arm64": "arm64"}


@dataclass
class ExportResult:
    image_id: str
    version: str
    digest: str = ""  # of the image manifest
    layer_bytes: int = 0
    tree_bytes: int = 0
    output: str | None = None
    pushed: PushResult | None = None
    tags: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        data = {k: v for k, v in self.__dict__.items() if k != "pushed"}
        if self.pushed is not None:
            data["pushed"] = self.pushed.to_json()
        return data


def export(build_dir: Path, *, version: str | None = None, output: Path | None = None,
           to: str | None = None, credentials: Credentials | None = None,
           insecure: bool = False) -> ExportResult:
    """Make the container image of a build; write it to `output` and/or push it to `to`."""
    if output is None and to is None:
        raise ParticleError("say where the image goes: --output DIR or --to REGISTRY/REPO")
    if output is not None and output.exists() and not (output / "oci-layout").is_file() \
            and any(output.iterdir()):
        raise ParticleError(f"{output}: exists and is not an OCI image layout; not replacing it")
    ref = Reference.parse(to) if to is not None else None
    built = find_base(build_dir, version)
    m = built.manifest
    result = ExportResult(m.id, m.version, tags=[oci_version_tag(m.version)])
    work = cache_root() / "work" / f"oci-{m.id}_{m.version}-{uuid.uuid4().hex[:8]}"
    tools = ToolsTree(m.mirror or DEFAULT_MIRROR)
    with interruptible(), work_dir(work):
        tools.ensure()
        root = work / "root"
        root.mkdir()
        with ui.step(f"system tree of {m.id} {m.version} from {built.usr_image.name}"):
            extract_usr(tools, built.usr_image, built.info.filesystem, root / "usr")
            root_from_usr(root / "usr", root)
            _settle_times(root)
        with ui.step("layer (tar + gzip)"):
            layer, diff_id, result.tree_bytes = _layer(root, work / "layer.tar.gz")
        result.layer_bytes = layer.size
        config = _json_blob(CONFIG_TYPE, _config(m, diff_id))
        manifest = _json_blob(MANIFEST_V1, {
            "schemaVersion": 2,
            "mediaType": MANIFEST_V1,
            "config": _descriptor(config),
            "layers": [_descriptor(layer)],
            "annotations": {"org.opencontainers.image.version": m.version,
                            "org.particleos.id": m.id,
                            "org.particleos.root-hash": m.root_hash},
        })
        result.digest = manifest.digest
        if ref is not None:
            registry = Registry(ref, credentials=credentials, insecure=insecure, push=True)
            pushed = PushResult(m.id, m.version, f"{ref.registry}/{ref.repository}",
                                digest=manifest.digest)
            upload(registry, [config, layer], pushed)
            tags = [result.tags[0], ref.tag or "latest"]
            for tag in dict.fromkeys(tags):
                registry.put_manifest(tag, manifest.data or b"")
            pushed.tags = list(dict.fromkeys(tags))
            result.pushed = pushed
        if output is not None:
            _write_layout(output, [config, layer], manifest, result.tags[0])
            result.output = str(output)
    return result


def _settle_times(root: Path) -> None:
    """The entries made here (mount points, links) get the time of /usr, not of this run: the
    same build then gives the same layer, and pushing it again uploads nothing."""
    stamp = (root / "usr").stat().st_mtime_ns
    for entry in [root, *root.iterdir()]:
        if entry.name not in ("usr", "etc", "var"):
            os.utime(entry, ns=(stamp, stamp), follow_symlinks=False)


def _layer(root: Path, dest: Path) -> tuple[Blob, str, int]:
    """The tree as one gzip tar layer: (blob, diff_id = digest of the tar, tar size)."""
    tar = dest.with_suffix("")
    # PAX headers without access/change times: the same tree gives the same layer.
    runner.run(["tar", "--create", f"--file={tar}", f"--directory={root}", "--sort=name",
                "--numeric-owner", "--format=posix", "--xattrs", "--xattrs-include=*",
                "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime", "."],
               what="tar of the system tree")
    raw, packed = hashlib.sha256(), hashlib.sha256()
    size = 0
    with tar.open("rb") as fin, dest.open("wb") as fout:
        hashing = _HashingWriter(fout, packed)
        with gzip.GzipFile(fileobj=hashing, mode="wb", compresslevel=1, mtime=0) as gz:
            while chunk := fin.read(1 << 20):
                raw.update(chunk)
                size += len(chunk)
                gz.write(chunk)
    tar.unlink()
    blob = Blob("", LAYER_TYPE, f"sha256:{packed.hexdigest()}", dest.stat().st_size, path=dest)
    return blob, f"sha256:{raw.hexdigest()}", size


class _HashingWriter:
    """A file wrapper that hashes what is written through it (gzip writes to it)."""

    def __init__(self, f: Any, h: Any) -> None:
        self.f, self.h = f, h

    def write(self, data: bytes) -> int:
        self.h.update(data)
        return int(self.f.write(data))

    def flush(self) -> None:
        self.f.flush()


def _config(m: Manifest, diff_id: str) -> dict[str, Any]:
    return {
        "architecture": GOARCH.get(m.architecture, m.architecture),
        "os": "linux",
        "config": {
            "Env": [PATH_ENV],
            "Cmd": ["/bin/bash"],
            "WorkingDir": "/",
            "Labels": {"org.opencontainers.image.version": m.version,
                       "org.particleos.id": m.id},
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": f"particle oci export ({m.id} {m.version})"}],
    }


def _json_blob(mtype: str, doc: dict[str, Any]) -> Blob:
    data = json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n"
    return Blob("", mtype, "sha256:" + hashlib.sha256(data).hexdigest(), len(data), data=data)


def _descriptor(blob: Blob) -> dict[str, Any]:
    return {"mediaType": blob.media_type, "digest": blob.digest, "size": blob.size}


def _write_layout(output: Path, blobs: list[Blob], manifest: Blob, tag: str) -> None:
    """An OCI image layout (oci-layout, index.json, blobs/sha256/*), replaced atomically."""
    with atomic_dir(output) as tmp:
        store = tmp / "blobs" / "sha256"
        store.mkdir(parents=True)
        for blob in [*blobs, manifest]:
            dest = store / blob.digest.removeprefix("sha256:")
            if blob.path is not None:
                try:
                    os.replace(blob.path, dest)
                except OSError:  # another file system than the cache's work directory
                    shutil.copyfile(blob.path, dest)
            else:
                dest.write_bytes(blob.data or b"")
            fsync_path(dest)
        (tmp / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}\n')
        index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                 "manifests": [{**_descriptor(manifest), "annotations": {REF_NAME: tag}}]}
        (tmp / "index.json").write_text(json.dumps(index, indent=2) + "\n")
        for name in ("oci-layout", "index.json"):
            fsync_path(tmp / name)
