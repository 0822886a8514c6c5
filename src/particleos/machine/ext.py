"""`particle ext`: system extensions on the running machine: list, add (from the update
source, a URL or a local file), remove, and sync after an update. Standard library only.

Layout: every version lives in the store (/var/lib/particle/extensions/<id>-<name>_<ver>.raw,
where sysupdate puts the versions of future updates too); /var/lib/extensions/<name>.raw links
to the version of the running base, with `<name>.usrhash` beside it so systemd-sysext and
systemd-dissect set up dm-verity with that root hash. Add and remove merge live with
`systemd-sysext refresh`; systemd-sysext.service merges again at every boot.
"""

from __future__ import annotations

import argparse
import configparser
import contextlib
import json
import os
from pathlib import Path

from ..formats import SHA256SUMS, parse_sha256sums, sha256_file
from . import overlay
from .files import remove_tree, write_atomic
from .sysext import (
    EXTENSIONS_DIR,
    MERGED_LIST,
    NAME_RE,
    OS_RELEASE,
    RELEASE_DIR,
    STORE_DIR,
    TRANSFER_DIR,
    TRANSFER_PREFIX,
    VENDOR_TRANSFER_DIR,
    ExtensionError,
    artifact_name,
    compatibility_problems,
    copy_file,
    describe,
    extension_transfer,
    hash_sidecar,
    machine_architecture,
    parse_artifact_name,
    parse_release,
    read_image,
    run,
    transfer_path,
)

PULL = "/usr/lib/systemd/systemd-pull"  # http(s): python3-minimal has no http client


def host_release() -> dict[str, str]:
    return parse_release(OS_RELEASE.read_text())


def merged_names() -> set[str]:
    """Extensions systemd-sysext has merged into /usr right now."""
    try:
        return set(MERGED_LIST.read_text().split())
    except OSError:
        return set()


# ---------------------------------------------------------------------------- sources


def update_source() -> tuple[str, str] | None:
    """(sysupdate source type, path) of the base's own updates: the `[update] source` the
    image was built with, as its transfer files in /usr/lib/sysupdate.d name it."""
    env = os.environ.get("PARTICLE_UPDATE_SOURCE")
    if env:
        return ("url-file" if "://" in env else "regular-file", env)
    for d in (TRANSFER_DIR, VENDOR_TRANSFER_DIR):
        for path in sorted(d.glob("*.transfer")) if d.is_dir() else []:
            if path.name.startswith(TRANSFER_PREFIX):
                continue
            cp = configparser.ConfigParser(interpolation=None, strict=False)
            with contextlib.suppress(configparser.Error, OSError):
                cp.read(path)
                if cp.has_option("Source", "Path") and cp.has_option("Source", "Type"):
                    return cp.get("Source", "Type"), cp.get("Source", "Path")
    return None


def _join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def _fetch(src: str, dest: Path, verbose: bool = False) -> str:
    """Copy a local path or file:// URL to `dest`; http(s) URLs are downloaded by systemd-pull
    (what systemd-sysupdate uses too). Returns the sha256 of the copy, for the caller to check."""
    if src.startswith(("http://", "https://")):
        run([PULL, "raw", "--direct", "--verify=no", "--sync=no", src, str(dest)],
            verbose=verbose)
        return sha256_file(dest)
    try:
        return copy_file(Path(src.removeprefix("file://")), dest)
    except OSError as err:
        raise ExtensionError(f"cannot fetch {src}: {err.strerror}") from None


def obtain(target: str, staging: Path, source: str | None, host: dict[str, str],
           no_verify: bool = False, verbose: bool = False) -> tuple[Path, str]:
    """Fetch the image named by `target` (NAME, PATH or URL) into `staging`, checked against
    the SHA256SUMS beside it (fetched first: nothing big is copied that cannot be verified).
    Returns (image, its sha256)."""
    if Path(target).is_file():
        src_image, src_dir = str(Path(target).resolve()), str(Path(target).resolve().parent)
    elif "://" in target:
        src_image, src_dir = target, target.rsplit("/", 1)[0]
    else:
        if not NAME_RE.match(target):
            raise ExtensionError(f"{target}: no such file, and not an extension name")
        if source is None:
            found = update_source()
            if found is None:
                raise ExtensionError(
                    f"cannot fetch extension {target}: this image has no update source "
                    "(`[update] source` in its spec); give the path or URL of the .raw file, "
                    "or --source DIR|URL"
                )
            source = found[1]
        src_dir = source
        src_image = _join(source, artifact_name(host["IMAGE_ID"], target, host["IMAGE_VERSION"]))
    name = src_image.rsplit("/", 1)[-1]
    image = staging / name
    want = None
    if not no_verify:
        index = staging / SHA256SUMS
        try:
            _fetch(_join(src_dir, SHA256SUMS), index, verbose)
        except ExtensionError:
            raise ExtensionError(
                f"no SHA256SUMS next to {src_image}: cannot verify it (pass --no-verify to "
                "install it anyway)") from None
        want = parse_sha256sums(index.read_text()).get(name)
        if want is None:
            raise ExtensionError(f"{name} is not listed in the SHA256SUMS next to {src_image}")
    have = _fetch(src_image, image, verbose)
    if want is None:
        print(f"warning: {name} installed without checking its digest (--no-verify)")
    elif have != want:
        raise ExtensionError(
            f"{name}: sha256 {have} does not match {want} from SHA256SUMS (corrupt or "
            "tampered download); nothing was installed"
        )
    return image, have


def write_root_hash(image: Path, root_hash: str) -> None:
    """`X.usrhash` beside the image, and the same as an xattr on it (systemd reads either)."""
    write_atomic(hash_sidecar(image), (root_hash + "\n").encode())
    with contextlib.suppress(OSError):
        os.setxattr(image, "user.verity.usrhash", root_hash.encode())


def read_extension_release(image: Path, staging: Path, verbose: bool) -> tuple[str, dict[str, str]]:
    """(name, fields) from the image's extension-release file, read by systemd-dissect (which
    checks dm-verity against the root hash beside the image on the way)."""
    out = staging / "release"
    run(["systemd-dissect", "--read-only", "--copy-from", str(image), "/" + RELEASE_DIR,
         str(out)], verbose=verbose)
    files = sorted(out.glob("extension-release.*")) if out.is_dir() else []
    if len(files) != 1:
        raise ExtensionError(f"{image.name}: expected one extension-release file, found "
                             f"{len(files)}: not a system extension")
    return files[0].name.removeprefix("extension-release."), parse_release(files[0].read_text())


# ---------------------------------------------------------------------------- install


def link_version(name: str, stored: Path) -> None:
    """Point /var/lib/extensions/NAME.raw (and .usrhash) at a stored version, atomically."""
    EXTENSIONS_DIR.mkdir(parents=True, exist_ok=True)
    link = EXTENSIONS_DIR / f"{name}.raw"
    tmp = EXTENSIONS_DIR / f".{name}.raw.tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    tmp.symlink_to(stored)
    os.replace(tmp, link)
    stored_hash = hash_sidecar(stored)
    if not stored_hash.exists():
        write_root_hash(stored, read_image(stored).root_hash)
    copy_file(stored_hash, EXTENSIONS_DIR / f".{name}.usrhash.tmp")
    os.replace(EXTENSIONS_DIR / f".{name}.usrhash.tmp", hash_sidecar(link))


def refresh(verbose: bool) -> None:
    with overlay.suspended(verbose):
        run(["systemd-sysext", "refresh"], verbose=verbose)


def installed_names() -> list[str]:
    if not EXTENSIONS_DIR.is_dir():
        return []
    return sorted(p.name.removesuffix(".raw") for p in EXTENSIONS_DIR.glob("*.raw")
                  if not p.name.startswith("."))


def cmd_add(args: argparse.Namespace) -> int:
    host = host_release()
    STORE_DIR.mkdir(parents=True, exist_ok=True)
    staging = STORE_DIR / f".incoming-{os.getpid()}"
    remove_tree(staging)
    staging.mkdir()
    try:
        image, _ = obtain(args.target, staging, args.source, host, args.no_verify,
                          args.verbose)
        info = read_image(image)
        write_root_hash(image, info.root_hash)
        name, fields = read_extension_release(image, staging, args.verbose)
        wanted = None if "/" in args.target or Path(args.target).is_file() else args.target
        if wanted and name != wanted:
            raise ExtensionError(f"{image.name} is extension {name}, not {wanted}")
        problems = compatibility_problems(fields, host, machine_architecture())
        if problems:
            raise ExtensionError(
                f"refusing extension {name} ({image.name}): " + "; ".join(problems) + ".\n"
                f"Install the {name} extension built for {describe(host)}: build it with "
                f"`particle ext build --base BUILD_DIR {name} PKG...` against that build."
            )
        stored = STORE_DIR / artifact_name(host["IMAGE_ID"], name, host["IMAGE_VERSION"])
        os.replace(image, stored)
        os.replace(hash_sidecar(image), hash_sidecar(stored))
        write_root_hash(stored, info.root_hash)
        link_version(name, stored)
        source = update_source()
        if source is not None:
            TRANSFER_DIR.mkdir(parents=True, exist_ok=True)
            transfer_path(name).write_text(
                extension_transfer(host["IMAGE_ID"], name, source[0], source[1]))
    finally:
        remove_tree(staging)
    refresh(args.verbose)
    if name not in merged_names():
        raise ExtensionError(
            f"installed {name}, but systemd-sysext did not merge it; see "
            "`systemd-sysext status` and `journalctl -b -t systemd-sysext`")
    print(f"added {name} (built for {describe(fields)}, root hash {info.root_hash[:16]}…): "
          "merged into /usr")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    name = args.name
    link = EXTENSIONS_DIR / f"{name}.raw"
    if not os.path.lexists(link):
        have = installed_names()
        raise ExtensionError(f"extension {name} is not installed"
                             + (f" (installed: {', '.join(have)})" if have else ""))
    host = host_release()
    for p in (link, hash_sidecar(link), transfer_path(name)):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    prefix = f"{host.get('IMAGE_ID', '')}-{name}_"
    for p in STORE_DIR.glob(f"{prefix}*") if STORE_DIR.is_dir() else []:
        p.unlink()
    refresh(args.verbose)
    if name in merged_names():
        raise ExtensionError(f"removed {name}, but systemd-sysext still has it merged")
    print(f"removed {name}: unmerged from /usr")
    return 0


def _stored_versions(image_id: str, name: str) -> list[str]:
    if not STORE_DIR.is_dir():
        return []
    found = (parse_artifact_name(p.name, image_id) for p in STORE_DIR.glob("*.raw"))
    return sorted(v for n, v in filter(None, found) if n == name)


def cmd_list(args: argparse.Namespace) -> int:
    host = host_release()
    image_id = host.get("IMAGE_ID", "")
    merged = merged_names()
    rows: list[dict[str, object]] = []
    for name in installed_names():
        link = EXTENSIONS_DIR / f"{name}.raw"
        parsed = parse_artifact_name(os.path.basename(os.readlink(link)), image_id) \
            if link.is_symlink() else None
        rows.append({
            "name": name,
            "version": parsed[1] if parsed else "?",
            "merged": name in merged,
            "stored": _stored_versions(image_id, name),
            "follows_updates": transfer_path(name).exists(),
        })
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no extensions installed (add one with `particle ext add NAME|PATH|URL`)")
        return 0
    print(f"{'NAME':<16} {'FOR VERSION':<16} {'MERGED':<7} STORED")
    for r in rows:
        stored = r["stored"]
        assert isinstance(stored, list)
        print(f"{r['name']!s:<16} {r['version']!s:<16} {'yes' if r['merged'] else 'no':<7} "
              f"{' '.join(stored)}")
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    """Point every installed extension at the stored version built for the running base
    (run at boot before systemd-sysext.service, so an update or a rollback brings its own
    extension versions). An extension without such a version is left unmerged, and said so."""
    host = host_release()
    image_id, version = host.get("IMAGE_ID", ""), host.get("IMAGE_VERSION", "")
    for name in installed_names():
        link = EXTENSIONS_DIR / f"{name}.raw"
        if not link.is_symlink():
            continue  # placed there by hand, not managed by particle
        want = STORE_DIR / artifact_name(image_id, name, version)
        if not want.exists():
            print(f"{name}: held back, no version for {image_id} {version} is installed "
                  f"(get it with `particle ext add {name}`)")
            continue
        if link.is_symlink() and Path(os.readlink(link)) == want \
                and hash_sidecar(link).exists():
            continue
        link_version(name, want)
        print(f"{name}: now the version for {image_id} {version}")
    if args.refresh:
        refresh(args.verbose)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("ext", help="system extensions: list, add, remove",
                       description="System extensions (systemd-sysext) built for this exact "
                                   "base: extra software on top of the read-only /usr.")
    def usage(_args: argparse.Namespace) -> int:
        p.print_help()
        return 2

    p.set_defaults(func=usage)
    esub = p.add_subparsers(dest="ext_verb", metavar="ACTION")
    lst = esub.add_parser("list", help="installed extensions and whether they are merged")
    lst.set_defaults(func=cmd_list)
    add = esub.add_parser("add", help="install an extension and merge it now",
                          description="Fetch NAME from the update source (or a PATH or URL), "
                                      "check its digest and that it was built for this base, "
                                      "install it and merge it into /usr at once.")
    add.add_argument("target", metavar="NAME|PATH|URL")
    add.add_argument("--source", help="update source to fetch NAME from (directory or URL)")
    add.add_argument("--no-verify", action="store_true",
                     help="install even without a SHA256SUMS entry to check against")
    add.set_defaults(func=cmd_add)
    rm = esub.add_parser("remove", help="unmerge an extension now and delete it")
    rm.add_argument("name")
    rm.set_defaults(func=cmd_remove)
    sync = esub.add_parser("sync", help="use the extension versions of the running base "
                                        "(run at boot)")
    sync.add_argument("--refresh", action="store_true", help="merge again afterwards")
    sync.set_defaults(func=cmd_sync)
