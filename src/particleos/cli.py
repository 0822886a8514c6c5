"""The `particle` command: a thin layer over the library. Every command that reads a spec
reports problems as `FILE: key.path: message` and exits 2; other failures exit 1 with a short
paragraph; `--debug` shows the traceback instead."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, cast

import click

from . import __version__
from .errors import Interrupted, ParticleError
from .ui import ui

SPEC_ARG = click.argument("spec", required=False, type=click.Path(path_type=Path))


def spec_options(f: Any) -> Any:
    f = click.option(
        "--set", "overrides", multiple=True, metavar="KEY=VALUE",
        help="Override a spec key, e.g. --set system.version=5 (repeatable).",
    )(f)
    f = click.option(
        "--profile", "profiles", multiple=True, metavar="NAME",
        help="Apply profiles/NAME.toml next to the spec (repeatable).",
    )(f)
    return f


def load(spec: Path | None, profiles: tuple[str, ...] = (), overrides: tuple[str, ...] = ()) -> Any:
    from .spec import load_spec, resolve_spec_path

    return load_spec(resolve_spec_path(spec), profiles=list(profiles), overrides=list(overrides))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="particle")
@click.option("-v", "--verbose", is_flag=True, help="Show the commands that run and their output.")
@click.option("-q", "--quiet", is_flag=True, help="Only print errors and results.")
@click.option("--debug", is_flag=True, help="Show Python tracebacks on errors.")
@click.pass_context
def cli(ctx: click.Context, verbose: bool, quiet: bool, debug: bool) -> None:
    """ParticleOS: declarative, signed, image-based Debian systems with A/B updates."""
    ui.verbose = verbose
    ui.quiet = quiet
    ctx.obj = {"debug": debug}


@cli.command()
@SPEC_ARG
@spec_options
def validate(spec: Path | None, profiles: tuple[str, ...], overrides: tuple[str, ...]) -> None:
    """Check a spec; print `ok` or every problem (exit status 2)."""
    load(spec, profiles, overrides)
    click.echo("ok")


@cli.command()
@SPEC_ARG
@spec_options
@click.option("--json", "as_json", is_flag=True, help="Print the resolved spec as JSON.")
def summary(
    spec: Path | None, profiles: tuple[str, ...], overrides: tuple[str, ...], as_json: bool
) -> None:
    """Print the fully resolved spec (after includes, profiles and --set)."""
    from .spec import summary_text

    s = load(spec, profiles, overrides)
    if as_json:
        click.echo(json.dumps(s.model_dump(mode="json"), indent=2))
    else:
        click.echo(summary_text(s))


@cli.command()
def schema() -> None:
    """Print the JSON Schema of particle.toml (for editors)."""
    from .spec import json_schema

    click.echo(json.dumps(json_schema(), indent=2))


@cli.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--id", "image_id", default=None, help="System id (default: the directory name).")
def init(directory: Path, image_id: str | None) -> None:
    """Write a commented starter spec (and a profile) into DIRECTORY."""
    from .spec.starter import write_starter

    for path in write_starter(directory, image_id):
        click.echo(f"wrote {path}")


@cli.command()
@SPEC_ARG
@spec_options
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Output directory (default: out/ next to the spec).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def build(spec: Path | None, profiles: tuple[str, ...], overrides: tuple[str, ...],
          output: Path | None, as_json: bool) -> None:
    """Build the disk image and the update artifacts of a spec."""
    from .builder import build as run_build
    from .spec import resolve_spec_path

    path = resolve_spec_path(spec)
    s = load(spec, profiles, overrides)
    out = output or path.parent / "out"
    if as_json:
        ui.quiet = True
    result = run_build(s, out)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
        return
    total = sum(result.timings.values())
    click.echo(f"built {result.id} {result.version} in {total:.0f} s")
    click.echo(f"  bootstrap:  {result.tree_path}")
    click.echo(f"  disk image: {result.disk}")
    click.echo(f"  root hash:  {result.root_hash}")
    for name in sorted(result.artifacts):
        click.echo(f"  {name} ({_human(result.artifacts[name].stat().st_size)})")


@cli.command()
@click.argument("image", required=False, type=click.Path(path_type=Path))
@click.option("--snapshot", is_flag=True, help="Discard all writes when QEMU exits.")
@click.option("--timeout", type=float, default=600.0, show_default=True,
              help="Seconds to wait for --expect.")
@click.option("--expect", metavar="REGEX", default=None,
              help="Exit 0 once REGEX appears on the console, non-zero on timeout/power-off.")
@click.option("--memory", type=int, default=2048, show_default=True, help="Guest RAM in MiB.")
@click.option("--secure-boot", is_flag=True,
              help="Enforce Secure Boot, with the image's signing certificate as PK, KEK, db.")
@click.option("--certificate", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Owner certificate to enroll (default: the one that signed the image).")
@click.option("--accel", type=click.Choice(["auto", "kvm", "tcg"]), default="auto",
              show_default=True, envvar="PARTICLE_ACCEL",
              help="auto: KVM when it really runs the firmware here, else TCG (also when KVM "
                   "fails during the boot); kvm: fail at once if it does not work.")
@click.option("--tpm", type=click.Path(path_type=Path, file_okay=False), default=None,
              metavar="DIR", help="Give the guest a TPM2 (swtpm) whose state lives in DIR "
                                  "(created if missing; the same DIR is the same TPM).")
def qemu(image: Path | None, snapshot: bool, timeout: float, expect: str | None,
         memory: int, secure_boot: bool, certificate: Path | None, accel: str,
         tpm: Path | None) -> None:
    """Boot a built image in QEMU with UEFI and a serial console. With --expect, exits
    non-zero as soon as the guest is known dead (QEMU stopped it, nothing to boot)."""
    import tempfile

    from .secureboot import firmware_vars
    from .vm import Accel, boot

    disk = find_image(image)
    with tempfile.TemporaryDirectory(prefix="particle-qemu-") as tmp:
        # A signed image needs its certificate in db (the kernel checks /usr against it).
        vars_file = firmware_vars(disk, secure_boot=secure_boot, certificate=certificate,
                                  directory=Path(tmp) if snapshot else disk.parent)
        sys.exit(boot(disk, snapshot=snapshot, timeout=timeout, expect=expect,
                      memory_mib=memory, vars_file=vars_file, secure_boot=secure_boot,
                      accel=cast(Accel, accel), tpm=tpm))


@cli.command(context_settings={"ignore_unknown_options": True,
                               "allow_interspersed_args": False})
@click.option("--keep", type=click.Path(path_type=Path, file_okay=False), default=None,
              metavar="DIR", help="Keep the container's root (/etc, /var, ...) in DIR across runs "
                   "(default: a throwaway root, removed at exit).")
@click.option("--version", "version", default=None,
              help="Version to run (default: the newest one in BUILD_DIR).")
@click.argument("build_dir", type=click.Path(path_type=Path, file_okay=False))
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def shell(keep: Path | None, version: str | None, build_dir: Path,
          command: tuple[str, ...]) -> None:
    """Run COMMAND (default: a login shell) in a build's system with systemd-nspawn, without
    booting it: the build's verified /usr read-only, /etc and /var from its factory copies.
    Exits with COMMAND's exit status."""
    from .container import shell as run_shell

    sys.exit(run_shell(build_dir, command, keep=keep, version=version))


@cli.command()
@click.argument("build_dir", required=False, type=click.Path(path_type=Path), default="out")
@click.option("--container", is_flag=True,
              help="Boot with systemd-nspawn (seconds) instead of QEMU (UEFI, minutes "
                   "under TCG): the build's verified /usr, a fresh root, private network.")
@click.option("--expect", metavar="REGEX", default=None,
              help="Exit 0 once REGEX appears on the console (the container is then shut "
                   "down), non-zero on timeout or when the system stops first.")
@click.option("--timeout", type=float, default=600.0, show_default=True,
              help="Seconds to wait for --expect.")
@click.option("--keep", type=click.Path(path_type=Path, file_okay=False), default=None,
              metavar="DIR", help="--container: keep the root's state in DIR across boots.")
@click.option("--version", "version", default=None,
              help="--container: version to boot (default: the newest one in BUILD_DIR).")
@click.option("--json", "as_json", is_flag=True,
              help="--container: print the result as JSON on stdout (console on stderr).")
@click.pass_context
def boot(ctx: click.Context, build_dir: Path, container: bool, expect: str | None,
         timeout: float, keep: Path | None, version: str | None, as_json: bool) -> None:
    """Boot a build: `particle qemu BUILD_DIR` (the disk image under UEFI) by default, or
    with --container its system under systemd-nspawn. The container powers off from inside
    (`poweroff`), with Ctrl-] three times, or on SIGTERM; a reboot inside starts it again on
    the same root. It prints when multi-user was reached."""
    from .container import boot as run_boot
    from .container import on_terminal

    if not container:
        for name, value in (("--keep", keep), ("--version", version), ("--json", as_json)):
            if value:
                raise ParticleError(f"{name} is an option of `particle boot --container`")
        ctx.invoke(qemu, image=build_dir, expect=expect, timeout=timeout)
        return
    if as_json:
        ui.quiet = True
    console = None if ui.quiet and not as_json else (
        sys.stderr.buffer if as_json else sys.stdout.buffer)
    result = run_boot(build_dir, keep=keep, version=version, expect=expect, timeout=timeout,
                      console=console, terminal=not as_json and on_terminal())
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
    else:
        if result.multi_user_seconds is not None:
            ui.info(f"particle boot: multi-user reached after {result.multi_user_seconds} s")
        if result.found_seconds is not None:
            click.echo(f"particle boot: found {expect!r} after {result.found_seconds} s",
                       err=True)
    sys.exit(0 if expect is not None else result.exit_status)


@cli.command()
@click.argument("image", type=click.Path(path_type=Path))
@click.argument("target", type=click.Path(path_type=Path))
@click.option("--size", default=None, metavar="SIZE",
              help="Size of a file target, e.g. 8G (default: the image's, or the file's).")
@click.option("--force", is_flag=True, help="Overwrite a target that holds partitions or data.")
@click.option("--yes", is_flag=True, help="Do not ask before writing a block device.")
def install(image: Path, target: Path, size: str | None, force: bool, yes: bool) -> None:
    """Write a built image (or the newest in a build directory) to a disk or a file: the
    image's partitions, the B slot empty, root grown to fill the disk at its first boot."""
    import stat as stat_mod

    from .disk.install import install as install_image
    from .machine.install import InstallError, confirm
    from .spec.model import parse_size

    disk = find_image(image)
    try:
        size_bytes = parse_size(size) if size is not None else None
    except ValueError as err:
        raise ParticleError(f"--size: {err}") from None
    block = target.exists() and stat_mod.S_ISBLK(target.stat().st_mode)

    def ask(question: str) -> bool:
        try:  # asked for block devices only: a file is made under a new name and renamed
            return not block or confirm(question, yes)
        except InstallError as err:
            raise ParticleError(str(err)) from None

    done = install_image(disk, target, size=size_bytes, force=force, confirm=ask, say=ui.info)
    click.echo(f"installed {done.version} on {done.target} ({_human(done.size)}); "
               "root grows to fill it at the first boot")


@cli.command()
@click.argument("directory", required=False, type=click.Path(path_type=Path), default="keys")
@click.option("--name", "common_name", default="ParticleOS owner", show_default=True,
              help="Common name of the certificate (shown by firmware and kernel).")
@click.option("--days", type=click.IntRange(min=1), default=3650, show_default=True,
              help="Validity of the certificate.")
@click.option("--force", is_flag=True, help="Replace an existing key set.")
def genkey(directory: Path, common_name: str, days: int, force: bool) -> None:
    """Create the owner's keys in DIRECTORY (default: ./keys): an X.509 key and certificate
    (signed /usr, Secure Boot) and an OpenPGP key (signed update metadata)."""
    from .keys import genkey as run_genkey

    files = run_genkey(directory, common_name, days=days, force=force)
    for path in (files.key, files.certificate, files.openpgp_key, files.openpgp_public):
        click.echo(f"wrote {path}")
    click.echo("\nAdd to particle.toml (paths relative to it), and keep the private keys "
               "out of version control:\n")
    click.echo(files.spec_snippet())


@cli.command()
@click.argument("build_dir", type=click.Path(path_type=Path, file_okay=False))
@click.argument("update_dir", type=click.Path(path_type=Path, file_okay=False))
@click.option("--keep", type=click.IntRange(min=1), default=None,
              help="Keep only the N newest versions in UPDATE_DIR (default: all).")
@click.option("--version", "version", default=None,
              help="Version to publish (default: the newest one in BUILD_DIR).")
@click.option("--openpgp-key", type=click.Path(path_type=Path, dir_okay=False), default=None,
              envvar="PARTICLE_OPENPGP_KEY",
              help="Sign SHA256SUMS with this key ([signing] openpgp_key); signed machines "
                   "refuse updates without it.")
@click.option("--no-chunks", is_flag=True,
              help="Do not put this version into the chunk store (machines then download "
                   "it whole).")
def publish(build_dir: Path, update_dir: Path, keep: int | None, version: str | None,
            openpgp_key: Path | None, no_chunks: bool) -> None:
    """Add a built version to a static update directory (served over http(s) or read as a
    local directory by `particle update` on the machines)."""
    from .openpgp import signer
    from .update.publish import publish as run_publish

    if str(update_dir).startswith("oci:"):
        from .errors import ParticleError

        raise ParticleError("publish writes a static update directory, not a registry",
                            hint=f"particle push {build_dir} "
                                 f"{str(update_dir).removeprefix('oci:').lstrip('/')}")
    _warn_unsigned_index(build_dir, openpgp_key)
    result = run_publish(build_dir, update_dir, keep=keep, version=version,
                         sign=signer(openpgp_key) if openpgp_key else None,
                         chunks=not no_chunks)
    state = "published" if result.added else "already published"
    click.echo(f"{state} {result.image_id} {result.version} in {update_dir} "
               f"({_human(result.update_bytes)} per update)")
    if result.chunked:
        n = sum(s.chunks for s in result.chunked)
        new = sum(s.new_chunks for s in result.chunked)
        added = sum(s.new_stored_bytes for s in result.chunked)
        size = sum(s.size for s in result.chunked)
        secs = sum(s.seconds for s in result.chunked)
        click.echo(f"  chunks: {n} ({new} new, {_human(added)} added to the store; "
                   f"{size / max(secs, 1e-6) / 2**20:.0f} MiB/s)")
        older = result.versions[: result.versions.index(result.version)] \
            if result.version in result.versions else []
        if older:
            from .store.delta import delta

            d = delta(update_dir, result.image_id, older[-1], result.version)
            click.echo(f"  delta from {older[-1]}: {_human(d.delta_bytes)} "
                       f"({100 * d.ratio:.1f} % of the full update)")
    if result.gc is not None and result.gc.removed:
        click.echo(f"  chunks removed: {result.gc.removed} ({_human(result.gc.removed_bytes)})")
    if result.removed_versions:
        click.echo(f"  removed: {', '.join(result.removed_versions)}")
    click.echo(f"  versions: {', '.join(result.versions)}")


def registry_options(f: Any) -> Any:
    f = click.option("--insecure", is_flag=True,
                     help="Plain http to the registry (always so for localhost/127.0.0.1).")(f)
    f = click.option("--password-stdin", is_flag=True,
                     help="Read the password for --username from stdin.")(f)
    f = click.option("--username", default=None,
                     help="Registry user (default: the credentials in auth.json/config.json).")(f)
    return f


def registry_credentials(target: str, username: str | None, password_stdin: bool) -> Any:
    """Explicit --username/--password-stdin, else the container tools' auth files."""
    from .errors import ParticleError
    from .oci.registry import Credentials, Reference, find_credentials

    if password_stdin and not username:
        raise ParticleError("--password-stdin needs --username")
    if username:
        if not password_stdin:
            raise ParticleError("--username needs --password-stdin (the password is never an "
                                "argument: other users could read it)")
        return Credentials(username, sys.stdin.readline().rstrip("\n"), "--password-stdin")
    return find_credentials(Reference.parse(target).registry)


@cli.command()
@click.argument("build_dir", type=click.Path(path_type=Path, file_okay=False))
@click.argument("target", metavar="REGISTRY/REPO[:TAG]")
@click.option("--version", "version", default=None,
              help="Version to push (default: the newest one in BUILD_DIR).")
@click.option("--openpgp-key", type=click.Path(path_type=Path, dir_okay=False), default=None,
              envvar="PARTICLE_OPENPGP_KEY",
              help="Sign the version's SHA256SUMS with this key ([signing] openpgp_key).")
@registry_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def push(build_dir: Path, target: str, version: str | None, openpgp_key: Path | None,
         username: str | None, password_stdin: bool, insecure: bool, as_json: bool) -> None:
    """Upload a built version to an OCI registry as an artifact, tagged with its version and
    TAG (default: latest). Blobs the registry already has are not uploaded again."""
    from .oci.artifact import push as run_push
    from .openpgp import signer

    if as_json:
        ui.quiet = True
    _warn_unsigned_index(build_dir, openpgp_key)
    result = run_push(build_dir, target, version=version,
                      sign=signer(openpgp_key) if openpgp_key else None,
                      credentials=registry_credentials(target, username, password_stdin),
                      insecure=insecure)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
        return
    click.echo(f"pushed {result.image_id} {result.version} to {result.repository} "
               f"({', '.join(result.tags)})")
    click.echo(f"  uploaded: {len(result.uploaded)} blobs, {_human(result.uploaded_bytes)}; "
               f"already there: {len(result.skipped)} blobs, {_human(result.skipped_bytes)}")
    click.echo(f"  manifest: {result.digest}")


@cli.command()
@click.argument("old", type=click.Path(path_type=Path, exists=True))
@click.argument("new", type=click.Path(path_type=Path, exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print the changes as JSON.")
def diff(old: Path, new: Path, as_json: bool) -> None:
    """What changes from build OLD to build NEW: packages added, removed, upgraded and
    downgraded, the kernel, the update's download size. Each is a build output directory
    (its newest version) or a `*.manifest.json`."""
    from .machine.changes import compare

    changes = compare(_manifest(old), _manifest(new))
    click.echo(json.dumps(changes.to_json(), indent=2) if as_json else changes.render())


def _manifest(path: Path) -> Any:
    """The manifest of a build: a manifest file, or the newest version in a build directory."""
    from .formats import Manifest, build_manifests
    from .machine.versions import version_key

    if path.is_file():
        try:
            return Manifest.read(path)
        except (OSError, ValueError) as err:
            raise ParticleError(f"{path}: not a build manifest ({err})") from None
    found = build_manifests(path)
    if not found:
        raise ParticleError(f"{path}: no build here (no *.manifest.json); run `particle build`")
    return max((m for _, m in found), key=lambda m: version_key(m.version))


@cli.command()
@click.argument("spec", required=False, type=click.Path(path_type=Path))
@click.option("--all", "everything", is_flag=True,
              help="Also remove the caches (trees, tools tree, apt archives).")
def clean(spec: Path | None, everything: bool) -> None:
    """Remove the build outputs of a spec (and with --all every cache)."""
    from .builder import clean as run_clean

    dirs: list[Path] = []
    candidate = spec or Path.cwd()
    out = (candidate if candidate.is_dir() else candidate.parent) / "out"
    if out.exists():
        dirs.append(out)
    for path in run_clean(dirs, caches=everything):
        click.echo(f"removed {path}")


def _add_ext_commands() -> None:
    from .ext.cli import ext
    from .oci.cli import oci

    cli.add_command(ext)
    cli.add_command(oci)


_add_ext_commands()


def find_image(image: Path | None) -> Path:
    """An image file, or the newest `*.raw` disk image in a directory (default: ./out)."""
    from .errors import ParticleError

    target = image or Path("out")
    if target.is_dir():
        disks = sorted(
            (p for p in target.glob("*.raw") if not p.name.endswith((".usr.raw", "-verity.raw",
                                                                    "-verity-sig.raw"))),
            key=lambda p: p.stat().st_mtime,
        )
        if not disks:
            raise ParticleError(f"no disk image (*.raw) in {target}; run `particle build` first")
        return disks[-1]
    if not target.exists():
        raise ParticleError(f"{target}: no such image; run `particle build` first")
    return target


def _warn_unsigned_index(build_dir: Path, openpgp_key: Path | None) -> None:
    """publish and push: a signed build whose index goes out unsigned is refused by machines."""
    if openpgp_key is None and any(build_dir.glob("*.usr-verity-sig.raw")):
        ui.info("warning: the build is signed but SHA256SUMS will not be: machines that verify "
                "updates will refuse it (pass --openpgp-key)")


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def main() -> None:
    """Console entry point: turn known errors into messages and exit codes, never tracebacks."""
    debug = "--debug" in sys.argv[1:]
    try:
        cli.main(standalone_mode=False)
    except ParticleError as err:
        if debug:
            raise
        click.echo(f"error: {err}" if err.exit_code != 2 else str(err), err=True)
        for line in (err.hint or "").splitlines():
            click.echo(f"hint: {line}", err=True)
        sys.exit(err.exit_code)
    except Interrupted as err:
        # SIGINT or SIGTERM during a build: its work directory is already removed.
        if debug:
            raise
        click.echo("interrupted", err=True)
        sys.exit(128 + err.signum)
    except click.exceptions.Exit as err:
        sys.exit(err.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
