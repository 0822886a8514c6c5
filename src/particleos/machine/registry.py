"""Updates from an OCI registry (`[update] source = "oci://HOST[:PORT]/REPO"`, or
`oci+http://` for a plain-http one): the distribution API spoken through curl (python3-minimal
has no HTTP client), the newest version found among the tags, and every byte checked before
systemd-sysupdate sees it:

* each blob's SHA-256 is the digest the manifest names (a registry, cache or proxy that serves
  other bytes is caught);
* the `SHA256SUMS` layer is signed by a key of the image's update keyring (machine.signature:
  import-pubring.gpg in /etc, else /usr/lib, the keyring sysupdate checks URL sources with);
* every file is listed in that index with the digest the manifest gives it, and carries this
  image's id and the version being installed (the signature covers the names, so an old signed
  index cannot be passed off as a newer version).

Only then are the files renamed into /var/lib/particle/incoming, from where sysupdate installs
them with the image's local transfers (`update.install_local`): the same slots, UKI last and
boot counting as a URL source. Anything off refuses the version and installs nothing.

Credentials: `/etc/particle/auth.json`, then `/etc/containers/auth.json` (the auth.json /
docker config.json format: `auths.<host>.auth` = base64 of `user:password`); the registry's
`WWW-Authenticate` challenge decides between Basic and a Bearer token from its token service.
Authorization headers reach curl on stdin (`--config -`), never on its command line.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import subprocess
import time
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..formats import (
    OCI_ARTIFACT_TYPE,
    OCI_ID,
    OCI_SCHEMES,
    OCI_TITLE,
    OCI_VERSION,
    PART_SUFFIXES,
    REQUIRED_PART_SUFFIXES,
    SHA256SUMS,
    SIGNATURE,
    auth_file_credentials,
    oci_api_host,
    oci_repository,
    oci_version_tag,
    parse_published_name,
    parse_sha256sums,
    sha256_file,
)
from ..formats import SOURCE_FILE as SOURCE_FILE_PATH
from . import signature as signature_check
from .cli import MachineError
from .entries import running_image
from .files import clear_dir, remove_tree
from .versions import vercmp, version_key

# Written by the builder for a registry source.
SOURCE_FILE = Path("/") / SOURCE_FILE_PATH
AUTH_FILES = (Path("/etc/particle/auth.json"), Path("/etc/containers/auth.json"))
MANIFEST_V1 = "application/vnd.oci.image.manifest.v1+json"
_HOST = re.compile(r"^(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:]+\])(?::\d{1,5})?$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


# --------------------------------------------------------------------------- the source


@dataclass(frozen=True)
class Source:
    scheme: str  # https | http
    host: str  # host[:port] as written
    repository: str

    @property
    def api_host(self) -> str:
        return oci_api_host(self.host)

    def __str__(self) -> str:
        return f"{'oci' if self.scheme == 'https' else 'oci+http'}://{self.host}/{self.repository}"


def parse_source(text: str) -> Source:
    """`oci://HOST[:PORT]/REPO` (https) or `oci+http://...`; ValueError says what is wrong."""
    scheme, sep, rest = text.partition("://")
    if not sep or scheme not in OCI_SCHEMES:
        raise ValueError(f"{text}: not a registry source (allowed: oci://HOST[:PORT]/REPO, or "
                         "oci+http://HOST[:PORT]/REPO for a plain-http registry)")
    host, _, repo = rest.partition("/")
    repo = repo.rstrip("/")
    if not _HOST.match(host):
        raise ValueError(f"{text}: {host!r} is not a registry host (allowed: HOST or HOST:PORT)")
    if "@" in repo or ":" in repo:
        raise ValueError(f"{text}: give the repository without a tag or digest (machines pick "
                         "the newest version among its tags)")
    repository = oci_repository(host, repo)
    if repository is None:
        raise ValueError(f"{text}: {repo!r} is not a repository name (allowed: lower case "
                         "letters, digits, . _ - and / between components)")
    return Source(OCI_SCHEMES[scheme], host, repository)


def configured_source() -> Source | None:
    """The image's registry source, or None when it updates from a URL or directory."""
    try:
        text = SOURCE_FILE.read_text().strip()
    except FileNotFoundError:
        return None
    try:
        return parse_source(text)
    except ValueError as err:
        raise MachineError(f"{SOURCE_FILE}: {err}") from None


# --------------------------------------------------------------------------- credentials


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str
    source: str  # the file they came from, for messages

    def basic(self) -> str:
        return "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()


def find_credentials(host: str, files: Iterable[Path] = AUTH_FILES) -> Credentials | None:
    """`user:password` for `host` from the first auth file that has an entry for it."""
    for path in files:
        try:
            found = auth_file_credentials(path, host)
        except ValueError as err:
            raise MachineError(str(err)) from None
        if found is not None:
            return Credentials(found[0], found[1], str(path))
    return None


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """`Bearer realm="...",service="...",scope="..."` -> ("bearer", {"realm": ..., ...})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {}
    for key, quoted, bare in re.findall(r'(\w+)=(?:"([^"]*)"|([^\s,"]+))', rest):
        params[key.lower()] = quoted or bare
    return scheme.lower(), params


# --------------------------------------------------------------------------- HTTP with curl


@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # lower-case names; the last response's (after redirects)
    body: bytes  # empty when the body went to a file


def parse_headers(text: str) -> dict[str, str]:
    """The header block of the last response in curl's -D output (one block per redirect)."""
    blocks = [b for b in re.split(r"\r?\n\r?\n", text) if b.strip()]
    headers: dict[str, str] = {}
    for line in (blocks[-1].splitlines()[1:] if blocks else []):
        name, sep, value = line.partition(":")
        if sep:
            headers.setdefault(name.strip().lower(), value.strip())
    return headers


def _describe(r: Reply) -> str:
    """HTTP status plus the registry's own error message (the distribution API's JSON)."""
    text = f"HTTP {r.status}"
    try:
        errors = json.loads(r.body).get("errors") or []
        if errors:
            text += f" {errors[0].get('code', '')}: {errors[0].get('message', '')}"
    except (ValueError, AttributeError):
        pass
    return text


class Client:
    """One repository on one registry, read-only (pull scope)."""

    def __init__(self, source: Source, work: Path, credentials: Credentials | None = None,
                 curl: str = "curl") -> None:
        self.source = source
        self.work = work  # for headers and small bodies
        self.credentials = credentials
        self.curl = curl
        self.authorization: str | None = None

    def _curl(self, url: str, *, accept: str | None = None, out: Path | None = None,
              authorization: str | None = None) -> Reply:
        self.work.mkdir(parents=True, exist_ok=True)
        head, body = self.work / ".headers", out or self.work / ".body"
        config = ['header = "User-Agent: particleos"']
        if accept:
            config.append(f'header = "Accept: {accept}"')
        if authorization:
            config.append(f'header = "Authorization: {authorization}"')
        argv = [self.curl, "--silent", "--show-error", "--fail-with-body", "--location",
                "--proto", "=http,https", "--proto-redir", "=http,https",
                "--connect-timeout", "30", "--speed-limit", "1024", "--speed-time", "60",
                "--retry", "2", "-D", str(head), "-o", str(body), "-w", "%{http_code}",
                "--config", "-", url]
        try:
            proc = subprocess.run(argv, input="\n".join(config) + "\n", capture_output=True,
                                  text=True, check=False)
        except FileNotFoundError:
            raise MachineError(f"{self.curl} is missing (package curl)") from None
        if proc.returncode not in (0, 22) or not proc.stdout.strip().isdigit():
            raise MachineError(f"cannot talk to the registry at {self.source.host}: "
                               f"{proc.stderr.strip() or f'curl exit status {proc.returncode}'}")
        status = int(proc.stdout.strip()[-3:])
        reply = Reply(status, parse_headers(_read_text(head)), b"")
        if out is None or status != 200:
            with contextlib.suppress(FileNotFoundError):
                reply.body = body.read_bytes()
            if out is None:
                body.unlink(missing_ok=True)
        return reply

    def get(self, path: str, *, accept: str | None = None, out: Path | None = None,
            ok: tuple[int, ...] = (200,)) -> Reply:
        """GET a path of the API (authenticating when the registry asks), or fail with the
        registry's message."""
        url = f"{self.source.scheme}://{self.source.api_host}{path}"
        for attempt in range(2):
            r = self._curl(url, accept=accept, out=out, authorization=self.authorization)
            if r.status != 401:
                break
            if attempt == 1:
                raise self._refused()
            self._authenticate(r.headers.get("www-authenticate", ""))
        if r.status not in ok:
            raise MachineError(f"{self.source.host}: GET {path}: {_describe(r)}")
        return r

    def _authenticate(self, challenge: str) -> None:
        scheme, params = parse_challenge(challenge)
        if scheme == "basic":
            if self.credentials is None:
                raise MachineError(
                    f"{self.source.host} needs credentials and none were found in "
                    f"{' or '.join(str(p) for p in AUTH_FILES)} (auth.json format: "
                    f'{{"auths": {{"{self.source.host}": {{"auth": base64 of user:password}}}}}})')
            self.authorization = self.credentials.basic()
            return
        if scheme != "bearer" or not params.get("realm", "").startswith(("http://", "https://")):
            raise MachineError(f"{self.source.host}: unsupported authentication {challenge!r}")
        query = {"scope": f"repository:{self.source.repository}:pull"}
        if "service" in params:
            query["service"] = params["service"]
        realm = params["realm"]
        url = realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(query)
        r = self._curl(url, authorization=self.credentials.basic() if self.credentials else None)
        if r.status in (401, 403):
            raise self._refused()
        if r.status != 200:
            raise MachineError(f"{self.source.host}: token service {realm}: {_describe(r)}")
        try:
            data = json.loads(r.body)
            token = data.get("token") or data.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token or not re.match(r"^[\w.~+/=-]+$", token):
            raise MachineError(f"{self.source.host}: the token service {realm} returned no token")
        self.authorization = f"Bearer {token}"

    def _refused(self) -> MachineError:
        if self.credentials is None:
            return MachineError(
                f"{self.source.host} refused anonymous access to {self.source.repository}: "
                f"put credentials into {AUTH_FILES[0]}")
        return MachineError(
            f"{self.source.host} refused the credentials of {self.credentials.username!r} "
            f"(from {self.credentials.source}) for {self.source.repository}")

    # --- the API ------------------------------------------------------------------------------

    def tags(self) -> list[str]:
        path: str | None = f"/v2/{self.source.repository}/tags/list"
        tags: list[str] = []
        while path:
            r = self.get(path, ok=(200, 404))
            if r.status == 404:
                raise MachineError(f"{self.source}: the registry has no such repository "
                                   "(nothing pushed there yet?)")
            try:
                tags += [str(t) for t in json.loads(r.body).get("tags") or []]
            except (ValueError, AttributeError):
                raise MachineError(f"{self.source}: the tag list is not JSON") from None
            m = re.match(r'<([^>]+)>;\s*rel="?next"?', r.headers.get("link", ""))
            path = m.group(1) if m and m.group(1).startswith("/v2/") else None
        return tags

    def manifest(self, reference: str) -> tuple[dict[str, Any], str]:
        """(manifest, its digest) of a tag; the digest is the one of the bytes received."""
        r = self.get(f"/v2/{self.source.repository}/manifests/{reference}", accept=MANIFEST_V1)
        digest = "sha256:" + hashlib.sha256(r.body).hexdigest()
        claimed = r.headers.get("docker-content-digest")
        if claimed and claimed != digest:
            raise MachineError(f"{self.source}:{reference}: the registry says the manifest is "
                               f"{claimed}, its bytes are {digest}")
        try:
            doc = json.loads(r.body)
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            raise MachineError(f"{self.source}:{reference}: the manifest is not a JSON object")
        return doc, digest

    def blob(self, digest: str, dest: Path) -> str:
        """Download a blob into `dest`; returns the SHA-256 of what arrived (hex)."""
        self.get(f"/v2/{self.source.repository}/blobs/{digest}", out=dest)
        return sha256_file(dest)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


# --------------------------------------------------------------------------- the newest version


@dataclass
class Candidate:
    version: str
    tag: str
    manifest: dict[str, Any]
    digest: str


def annotations_of(doc: dict[str, Any]) -> dict[str, str]:
    ann = doc.get("annotations")
    return {str(k): str(v) for k, v in ann.items()} if isinstance(ann, dict) else {}


def choose(tags: Iterable[str], manifest_of: Callable[[str], tuple[dict[str, Any], str]],
           image_id: str, running: str) -> Candidate | None:
    """The newest version of `image_id` newer than `running`, in systemd's version order.
    Moving tags (latest, stable: no digit, or a manifest whose version maps to another tag)
    are not versions. A tag with `_` may stand for a character tags cannot hold (`2.0~rc1` is
    tagged `2.0_rc1`): its manifest says the exact version before the order is decided."""
    fetched: dict[str, tuple[dict[str, Any], str]] = {}
    order: list[tuple[str, str]] = []  # (version, tag)
    for tag in tags:
        if not any(c.isdigit() for c in tag):
            continue
        if "_" in tag:
            fetched[tag] = manifest_of(tag)
            order.append((annotations_of(fetched[tag][0]).get(OCI_VERSION) or tag, tag))
        else:
            order.append((tag, tag))
    order.sort(key=lambda vt: version_key(vt[0]), reverse=True)
    for version, tag in order:
        if vercmp(version, running) <= 0:
            return None
        doc, digest = fetched.get(tag) or manifest_of(tag)
        ann = annotations_of(doc)
        if (doc.get("artifactType") == OCI_ARTIFACT_TYPE and ann.get(OCI_ID) == image_id
                and ann.get(OCI_VERSION) == version and oci_version_tag(version) == tag):
            return Candidate(version, tag, doc, digest)
    return None


# --------------------------------------------------------------------------- verification


class Refused(MachineError):
    """The registry offered something that does not check out: nothing is installed."""


@dataclass(frozen=True)
class Layer:
    title: str
    digest: str
    size: int


@dataclass
class Plan:
    """The layers of a version to fetch: the index, its signature, the files to install."""

    sums: Layer
    signature: Layer
    files: list[Layer] = field(default_factory=list)


def plan(doc: dict[str, Any], image_id: str, version: str) -> Plan:
    """The layers to fetch, or Refused: the index and its signature must be there, and one of
    each file the local transfers install, named for this image and version."""
    by_title: dict[str, Layer] = {}
    for d in doc.get("layers") or []:
        if not isinstance(d, dict):
            continue
        title = annotations_of(d).get(OCI_TITLE, "")
        digest, size = str(d.get("digest", "")), d.get("size")
        if not title:
            continue
        if not _DIGEST.match(digest) or not isinstance(size, int) or size < 0:
            raise Refused(f"layer {title!r}: digest {digest!r} or size {size!r} is malformed")
        if title in by_title:
            raise Refused(f"the manifest has two layers named {title}")
        by_title[title] = Layer(title, digest, size)
    if SHA256SUMS not in by_title:
        raise Refused(f"the manifest has no {SHA256SUMS} layer (not pushed by particle push?)")
    if SIGNATURE not in by_title:
        raise Refused(f"{SHA256SUMS} is not signed (no {SIGNATURE} layer: push with "
                      "--openpgp-key)")
    files = []
    for suffix in PART_SUFFIXES:
        found = [layer for t, layer in by_title.items()
                 if parse_published_name(t, image_id) == (version, suffix)]
        if len(found) > 1:
            raise Refused(f"the manifest has more than one *{suffix} layer")
        if not found and suffix in REQUIRED_PART_SUFFIXES:
            raise Refused(f"the manifest has no {image_id}_{version}*{suffix} layer")
        files += found
    return Plan(by_title[SHA256SUMS], by_title[SIGNATURE], files)


def check_index(files: list[Layer], sums: dict[str, str]) -> list[str]:
    """What the signed index contradicts: every file must be listed, with the digest the
    manifest gives its blob (the blob is checked against that digest when it arrives)."""
    problems = []
    for layer in files:
        listed = sums.get(layer.title)
        if listed is None:
            problems.append(f"{layer.title} is not listed in the signed {SHA256SUMS}")
        elif f"sha256:{listed}" != layer.digest:
            problems.append(f"{layer.title}: the manifest says {layer.digest}, the signed "
                            f"{SHA256SUMS} sha256:{listed}")
    return problems


def verify_signature(data: Path, signature: Path, keyring: Path, home: Path) -> str:
    """The signed index against the image's update keyring; returns the signing key's
    fingerprint (machine.signature, the check URL sources get too)."""
    try:
        return signature_check.verify(data, signature, keyring, home)
    except signature_check.SignatureError as err:
        if not keyring.is_file():
            raise Refused(str(err)) from None
        raise Refused(f"{SHA256SUMS}: {err}") from None


# --------------------------------------------------------------------------- fetch


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def newest_version(running: str, work: Path | None = None) -> str | None:
    """The newest version the registry has for this image, if newer than `running`
    (for `particle update --check`: nothing is downloaded but manifests)."""
    source = configured_source()
    if source is None:
        raise MachineError(f"{SOURCE_FILE} is missing: this image has no registry source")
    work = work or Path(f"/run/particle-registry.{os.getpid()}")
    try:
        client = Client(source, work, find_credentials(source.host))
        image_id, _ = running_image()
        found = choose(client.tags(), client.manifest, image_id, running)
        return found.version if found else None
    finally:
        remove_tree(work)


def fetch(running: str, installed: Iterable[str], incoming: Path, *,
          source: Source | None = None, image_id: str | None = None,
          auth_files: Iterable[Path] = AUTH_FILES, keyring: Path | None = None,
          log: Callable[[str], None] = print) -> str | None:
    """Put the newest version's files into `incoming`, verified; returns its version, or None
    when there is nothing to install (up to date, or that version already has a boot entry).
    Refused (nothing left in `incoming`) when anything does not check out."""
    source = source or configured_source()
    if source is None:
        raise MachineError(f"{SOURCE_FILE} is missing: this image has no registry source")
    image_id = image_id if image_id is not None else running_image()[0]
    keyring = keyring or signature_check.update_keyring() or signature_check.KEYRINGS[-1]
    incoming.mkdir(parents=True, exist_ok=True)
    clear_dir(incoming)  # only what this run verifies may be installed from here
    work = incoming / ".oci"
    done = False
    try:
        client = Client(source, work, find_credentials(source.host, auth_files))
        found = choose(client.tags(), client.manifest, image_id, running)
        if found is None:
            log(f"no version newer than {running} at {source}")
            return None
        if found.version in set(installed):
            log(f"{found.version} is already installed")
            return None
        log(f"newest version at {source}: {found.version} (manifest {found.digest})")
        try:
            version = _fetch_verified(client, found, image_id, incoming, work, keyring, log)
        except Refused as err:
            raise Refused(f"refusing {found.version} from {source}: {err}; nothing was "
                          "installed") from None
        done = True
        return version
    finally:
        remove_tree(work)
        if not done:
            clear_dir(incoming)


def _fetch_verified(client: Client, found: Candidate, image_id: str, incoming: Path,
                    work: Path, keyring: Path, log: Callable[[str], None]) -> str:
    p = plan(found.manifest, image_id, found.version)
    small: dict[str, Path] = {}
    for layer in (p.sums, p.signature):
        dest = work / layer.title
        got = client.blob(layer.digest, dest)
        if f"sha256:{got}" != layer.digest:
            raise Refused(f"{layer.title}: the registry sent sha256:{got}, the manifest names "
                          f"{layer.digest}")
        small[layer.title] = dest
    fingerprint = verify_signature(small[SHA256SUMS], small[SIGNATURE], keyring,
                                   work / "gnupg")
    log(f"{SHA256SUMS} is signed by {fingerprint} (trusted: {keyring})")
    problems = check_index(p.files, parse_sha256sums(_read_text(small[SHA256SUMS])))
    if problems:
        raise Refused("; ".join(problems))
    need = sum(layer.size for layer in p.files)
    st = os.statvfs(incoming)
    if st.f_bavail * st.f_frsize < need + (16 << 20):
        raise MachineError(f"{incoming}: {_mib(st.f_bavail * st.f_frsize)} free, the version "
                           f"needs {_mib(need)}")
    log(f"downloading {len(p.files)} files, {_mib(need)}")
    for layer in p.files:
        dest = work / f"{layer.title}.part"
        t0 = time.monotonic()
        got = client.blob(layer.digest, dest)
        seconds = max(time.monotonic() - t0, 0.001)
        if f"sha256:{got}" != layer.digest:
            raise Refused(f"{layer.title}: the registry sent content with sha256:{got}, the "
                          f"manifest and the signed {SHA256SUMS} say {layer.digest}")
        log(f"  {layer.title}: {_mib(dest.stat().st_size)} in {seconds:.1f} s, sha256 ok")
    for layer in p.files:  # all verified: now sysupdate may see them
        os.rename(work / f"{layer.title}.part", incoming / layer.title)
    return found.version
