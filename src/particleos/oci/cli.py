"""`particle oci ...`: container images of builds (`particle push` is a top-level command)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..ui import ui


@click.group()
def oci() -> None:
    """OCI container images of built systems."""


@oci.command("export")
@click.argument("build_dir", type=click.Path(path_type=Path, file_okay=False))
@click.option("--version", "version", default=None,
              help="Version to export (default: the newest build in BUILD_DIR).")
@click.option("-o", "--output", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Write an OCI image layout directory (skopeo/podman: oci:DIR).")
@click.option("--to", "to", metavar="REGISTRY/REPO[:TAG]", default=None,
              help="Push the image, tagged with the version and TAG (default: latest).")
@click.option("--insecure", is_flag=True,
              help="Plain http to the registry (always so for localhost/127.0.0.1).")
@click.option("--username", default=None, help="Registry user (with --password-stdin).")
@click.option("--password-stdin", is_flag=True, help="Read the registry password from stdin.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def export_cmd(build_dir: Path, version: str | None, output: Path | None, to: str | None,
               insecure: bool, username: str | None, password_stdin: bool,
               as_json: bool) -> None:
    """A container image of the system's tree (/usr plus the factory /etc and /var), so that
    `podman run` runs its programs without a VM."""
    from ..cli import _human, registry_credentials
    from .export import export

    if as_json:
        ui.quiet = True
    creds = registry_credentials(to, username, password_stdin) if to else None
    result = export(build_dir, version=version, output=output, to=to, credentials=creds,
                    insecure=insecure)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
        return
    click.echo(f"exported {result.image_id} {result.version}: {result.digest} "
               f"(layer {_human(result.layer_bytes)}, tree {_human(result.tree_bytes)})")
    if result.output:
        click.echo(f"  OCI layout: {result.output} (e.g. podman run --rm "
                   f"oci:{result.output}:{result.tags[0]} cat /usr/lib/os-release)")
    if result.pushed:
        click.echo(f"  pushed to {result.pushed.repository} ({', '.join(result.pushed.tags)}); "
                   f"uploaded {_human(result.pushed.uploaded_bytes)}")
