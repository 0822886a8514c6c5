"""`particle ext build --base BUILD_DIR NAME PKG...`: one extension for an existing build,
without rebuilding the base (the fast path: seconds for the packages, not a whole image)."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import click

from ..builder.artifacts import deliver
from ..cache import cache_root, work_dir
from ..errors import ParticleError
from ..formats import sha256_file
from ..machine.sysext import NAME_RE, artifact_name
from ..runner import interruptible
from ..tools import ToolsTree
from ..ui import ui
from .base import extract_usr, find_base, root_from_usr
from .builder import ExtensionResult, build_extension
from .image import VeritySigner

DEFAULT_MIRROR = "http://deb.debian.org/debian"


@dataclass
class ExtBuild:
    result: ExtensionResult
    image_id: str
    version: str
    seconds: float


def build_for_base(
    build_dir: Path, name: str, packages: list[str], *, version: str | None = None,
    output: Path | None = None, signer: VeritySigner | None = None,
) -> ExtBuild:
    """Build extension `name` for the base in `build_dir`; the image and SHA256SUMS go to
    `output` (default: `build_dir`, next to the base's own artifacts)."""
    if not NAME_RE.match(name):
        raise ParticleError(f"bad extension name {name!r} (allowed: letters, digits and '-')")
    start = time.monotonic()
    built = find_base(build_dir, version)
    info = built.info
    out_dir = (output or build_dir).resolve()
    work = cache_root() / "work" / f"ext-{info.image_id}_{info.version}-{uuid.uuid4().hex[:8]}"
    tools = ToolsTree(built.manifest.mirror or DEFAULT_MIRROR)
    with interruptible(), work_dir(work):
        tools.ensure()
        staging = work / "out"
        staging.mkdir()
        with ui.step(f"base /usr of {info.image_id} {info.version} from {built.usr_image.name}"):
            (work / "base-root").mkdir()
            extract_usr(tools, built.usr_image, info.filesystem, work / "base-usr",
                        work / "base-root/usr")
            root_from_usr(work / "base-usr", work / "base-root")
        fname = artifact_name(info.image_id, name, info.version)
        with ui.step(f"extension {name}: {' '.join(packages)}"):
            result = build_extension(
                name=name, packages=packages, base=info, base_root=work / "base-root",
                base_usr=work / "base-usr", out=staging / fname, work=work, tools=tools,
                signer=signer, scratch_root=True,
            )
        deliver(staging, out_dir, {fname: sha256_file(result.path)}, extra=[])
        result.path = out_dir / fname
    return ExtBuild(result, info.image_id, info.version, time.monotonic() - start)


@click.group()
def ext() -> None:
    """System extensions (sysext) for built images."""


@ext.command("build")
@click.option("--base", "base", required=True, type=click.Path(path_type=Path, file_okay=False,
              exists=True), help="Output directory of `particle build` (the base image).")
@click.option("--version", default=None, help="Base version in BUILD_DIR (default: newest).")
@click.option("-o", "--output", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Where the image goes (default: the base's directory, added to SHA256SUMS).")
@click.option("--key", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              default=None, help="Sign the verity root hash with this key (with --certificate).")
@click.option("--certificate", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              default=None)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.argument("name")
@click.argument("packages", nargs=-1, required=True)
def build_cmd(base: Path, version: str | None, output: Path | None, key: Path | None,
              certificate: Path | None, as_json: bool, name: str,
              packages: tuple[str, ...]) -> None:
    """Build extension NAME with PACKAGES for the image built in BUILD_DIR."""
    signer = None
    if (key is None) != (certificate is None):
        raise ParticleError("--key and --certificate go together")
    if key is not None and certificate is not None:
        from ..keys import load_key_pair
        from ..signing import verity_signature_partition

        pair = load_key_pair(key, certificate)
        signer = lambda h: verity_signature_partition(pair, h)  # noqa: E731
    if as_json:
        ui.quiet = True
    done = build_for_base(base, name, list(packages), version=version, output=output,
                          signer=signer)
    r = done.result
    if as_json:
        click.echo(json.dumps({**r.to_json(), "path": str(r.path),
                               "total_seconds": round(done.seconds, 1)}, indent=2))
        return
    click.echo(f"built extension {name} for {done.image_id} {done.version} in "
               f"{done.seconds:.0f} s")
    click.echo(f"  {r.path} ({r.image_bytes / 2**20:.1f} MiB, {r.files} entries under /usr)")
    click.echo(f"  packages: {len(r.packages)} new ({r.deb_bytes / 2**20:.1f} MiB of .deb, "
               f"{r.installed_bytes / 2**20:.1f} MiB installed)")
    if r.modules:
        click.echo(f"  kernel modules: {', '.join(r.modules)}")
    click.echo(f"  root hash: {r.root_hash}")
    click.echo(f"  on the machine: particle ext add {name}   (or the path/URL of the file)")
