"""A small client of the OCI distribution API (the protocol of Docker's distribution, Harbor,
Quay and the cloud registries): blobs by digest, manifests by tag or digest, and the anonymous,
Basic and Bearer-token authentication flows.

Why our own client rather than a tool: Debian 12 has no oras, and skopeo copies container
images between transports but does not upload arbitrary files as an artifact with our own media
types and annotations. The part of the protocol we need is small (HEAD, POST + PUT, GET) and
the standard library speaks it; no dependency to keep up to date, and every request is ours to
count (which blobs were uploaded and which the registry already had).

Credentials come from the files the container tools use (`$REGISTRY_AUTH_FILE`,
`$XDG_RUNTIME_DIR/containers/auth.json`, `~/.config/containers/auth.json`,
`~/.docker/config.json`: `auths.<host>.auth` = base64 of `user:password`), or are given
explicitly. Plain http is used only for a registry on the loopback address or when asked.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final

from ..errors import ParticleError
from ..formats import auth_file_credentials, oci_api_host, oci_repository

MANIFEST_V1: Final = "application/vnd.oci.image.manifest.v1+json"
INDEX_V1: Final = "application/vnd.oci.image.index.v1+json"
_ACCEPT: Final = ", ".join([MANIFEST_V1, INDEX_V1,
                            "application/vnd.docker.distribution.manifest.v2+json"])
_LOOPBACK: Final = {"localhost", "127.0.0.1", "::1", "[::1]"}
_TAG: Final = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class Reference:
    """`REGISTRY/REPO[:TAG]`, e.g. `registry.example.org:5000/fleet/web:latest`."""

    registry: str  # host[:port] as written (docker.io for Docker Hub)
    repository: str
    tag: str | None = None

    @classmethod
    def parse(cls, text: str) -> Reference:
        ref = text.removeprefix("oci://")
        host, _, rest = ref.partition("/")
        if not rest or not ("." in host or ":" in host or host == "localhost"):
            raise ParticleError(
                f"{text}: give the registry host, e.g. registry.example.org/fleet/os:latest "
                "or 127.0.0.1:5000/os"
            )
        tag = None
        if "@" in rest:
            raise ParticleError(f"{text}: push to a tag, not to a digest")
        name, colon, maybe_tag = rest.rpartition(":")
        if colon and "/" not in maybe_tag:
            rest, tag = name, maybe_tag
            if not _TAG.match(tag):
                raise ParticleError(f"{text}: {tag!r} is not a valid tag")
        repository = oci_repository(host, rest)
        if repository is None:
            raise ParticleError(
                f"{text}: {rest!r} is not a valid repository name (lower case, digits, . _ - /)"
            )
        return cls(host, repository, tag)

    @property
    def api_host(self) -> str:
        return oci_api_host(self.registry)

    def __str__(self) -> str:
        return f"{self.registry}/{self.repository}" + (f":{self.tag}" if self.tag else "")


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str
    source: str  # where they came from, for error messages


def auth_files() -> list[Path]:
    """The credential files the container tools read, in their order of precedence."""
    files = []
    if env := os.environ.get("REGISTRY_AUTH_FILE"):
        files.append(Path(env))
    if runtime := os.environ.get("XDG_RUNTIME_DIR"):
        files.append(Path(runtime) / "containers/auth.json")
    config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    files.append(config / "containers/auth.json")
    docker = Path(os.environ.get("DOCKER_CONFIG") or Path.home() / ".docker")
    files.append(docker / "config.json")
    return files


def find_credentials(registry: str, files: list[Path] | None = None) -> Credentials | None:
    """`user:password` for `registry` from the first auth file that has an entry for it."""
    for path in files if files is not None else auth_files():
        try:
            found = auth_file_credentials(path, registry)
        except ValueError as err:
            raise ParticleError(str(err)) from err
        if found is not None:
            return Credentials(found[0], found[1], str(path))
    return None


@dataclass
class Response:
    status: int
    headers: http.client.HTTPMessage
    body: bytes


Body = bytes | Callable[[], IO[bytes]] | None


class Registry:
    """One repository on one registry. `push` asks for push rights when a token is needed."""

    def __init__(self, ref: Reference, *, credentials: Credentials | None = None,
                 insecure: bool = False, push: bool = False) -> None:
        self.ref = ref
        host = ref.api_host
        self.scheme = "http" if insecure or host.rsplit(":", 1)[0] in _LOOPBACK else "https"
        self.host = host
        self.credentials = credentials
        self.push = push
        self._authorization: str | None = None

    # --- the API ------------------------------------------------------------------------------

    def has_blob(self, digest: str) -> bool:
        r = self._request("HEAD", self._path(f"blobs/{digest}"), ok=(200, 404))
        return r.status == 200

    def upload_blob(self, digest: str, size: int, body: Body) -> None:
        """POST for an upload session, then one PUT with the whole blob (monolithic upload)."""
        r = self._request("POST", self._path("blobs/uploads/"), ok=(202,), body=b"")
        location = r.headers.get("Location")
        if not location:
            raise ParticleError(f"{self.host}: the registry gave no upload location")
        url = urllib.parse.urljoin(f"{self.scheme}://{self.host}/", location)
        url += ("&" if "?" in url else "?") + urllib.parse.urlencode({"digest": digest})
        self._request("PUT", url, ok=(201,), body=body,
                      headers={"Content-Type": "application/octet-stream",
                               "Content-Length": str(size)})

    def put_manifest(self, reference: str, manifest: bytes, media_type: str = MANIFEST_V1) -> str:
        self._request("PUT", self._path(f"manifests/{reference}"), ok=(201,), body=manifest,
                      headers={"Content-Type": media_type,
                               "Content-Length": str(len(manifest))})
        return "sha256:" + hashlib.sha256(manifest).hexdigest()

    def get_manifest(self, reference: str) -> tuple[bytes, str]:
        """(bytes, digest) of a manifest by tag or digest; the digest is checked."""
        r = self._request("GET", self._path(f"manifests/{reference}"), ok=(200,),
                          headers={"Accept": _ACCEPT})
        digest = "sha256:" + hashlib.sha256(r.body).hexdigest()
        if reference.startswith("sha256:") and reference != digest:
            raise ParticleError(f"{self.host}: manifest {reference} arrived with digest {digest}")
        return r.body, digest

    def get_blob(self, digest: str) -> bytes:
        """A (small) blob by digest, checked against it."""
        r = self._request("GET", self._path(f"blobs/{digest}"), ok=(200,))
        if "sha256:" + hashlib.sha256(r.body).hexdigest() != digest:
            raise ParticleError(f"{self.host}: blob {digest} arrived with other content")
        return r.body

    def tags(self) -> list[str]:
        r = self._request("GET", self._path("tags/list"), ok=(200, 404))
        if r.status == 404:
            return []
        return list(json.loads(r.body).get("tags") or [])

    # --- HTTP and authentication --------------------------------------------------------------

    def _path(self, tail: str) -> str:
        return f"/v2/{self.ref.repository}/{tail}"

    def _request(self, method: str, target: str, *, ok: tuple[int, ...], body: Body = None,
                 headers: dict[str, str] | None = None, redirects: int = 3) -> Response:
        for attempt in range(2):
            r = self._send(method, target, body, headers or {})
            if r.status != 401:
                break
            if attempt == 1:
                raise self._refused()
            self._authenticate(r.headers.get("WWW-Authenticate", ""))
        if r.status in (301, 302, 303, 307, 308) and method in ("GET", "HEAD") and redirects:
            # Blob downloads may be redirected to a storage service (no registry credentials).
            location = r.headers.get("Location", "")
            return _plain_request(method, urllib.parse.urljoin(self._url(target), location),
                                  ok)
        if r.status not in ok:
            raise ParticleError(f"{self.host}: {method} {urllib.parse.urlsplit(target).path}: "
                                f"{_describe(r)}")
        return r

    def _url(self, target: str) -> str:
        return target if "://" in target else f"{self.scheme}://{self.host}{target}"

    def _send(self, method: str, target: str, body: Body, headers: dict[str, str]) -> Response:
        url = self._url(target)
        all_headers = {"User-Agent": "particleos", **headers}
        if self._authorization:
            all_headers["Authorization"] = self._authorization
        return _http(method, url, body, all_headers)

    def _authenticate(self, challenge: str) -> None:
        scheme, params = _parse_challenge(challenge)
        if scheme == "basic":
            if self.credentials is None:
                raise ParticleError(
                    f"{self.ref.registry} needs credentials and none were found",
                    hint="run `podman login` (or docker login), or pass --username and "
                         "--password-stdin",
                )
            raw = f"{self.credentials.username}:{self.credentials.password}".encode()
            self._authorization = "Basic " + base64.b64encode(raw).decode()
            return
        if scheme != "bearer" or "realm" not in params:
            raise ParticleError(f"{self.host}: unsupported authentication {challenge!r}")
        actions = "pull,push" if self.push else "pull"
        query = {"scope": f"repository:{self.ref.repository}:{actions}"}
        if "service" in params:
            query["service"] = params["service"]
        token_url = params["realm"] + ("&" if "?" in params["realm"] else "?") \
            + urllib.parse.urlencode(query)
        token_headers = {"User-Agent": "particleos"}
        if self.credentials is not None:
            raw = f"{self.credentials.username}:{self.credentials.password}".encode()
            token_headers["Authorization"] = "Basic " + base64.b64encode(raw).decode()
        r = _http("GET", token_url, None, token_headers)
        if r.status in (401, 403):
            raise self._refused()
        if r.status != 200:
            raise ParticleError(f"{self.host}: token service: {_describe(r)}")
        try:
            data = json.loads(r.body)
            token = data.get("token") or data.get("access_token")
        except ValueError:
            token = None
        if not isinstance(token, str) or not token:
            raise ParticleError(f"{self.host}: the token service returned no token")
        self._authorization = f"Bearer {token}"

    def _refused(self) -> ParticleError:
        if self.credentials is None:
            return ParticleError(
                f"{self.ref.registry} refused anonymous access to {self.ref.repository}",
                hint="log in (podman login / docker login) or pass --username and "
                     "--password-stdin",
            )
        return ParticleError(
            f"{self.ref.registry} refused the credentials of {self.credentials.username!r} "
            f"(from {self.credentials.source}) for {self.ref.repository}",
            hint="check the user name and password, and that the user may push there",
        )


def _http(method: str, url: str, body: Body, headers: dict[str, str]) -> Response:
    parts = urllib.parse.urlsplit(url)
    conn_type = http.client.HTTPSConnection if parts.scheme == "https" \
        else http.client.HTTPConnection
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    conn = conn_type(parts.netloc, timeout=120, blocksize=1 << 20)
    stream: IO[bytes] | None = None
    try:
        payload: bytes | IO[bytes] | None
        if callable(body):
            payload = stream = body()
        else:
            payload = body
        conn.request(method, target, body=payload, headers=headers)
        resp = conn.getresponse()
        data = resp.read() if method != "HEAD" else b""
        return Response(resp.status, resp.headers, data)
    except (OSError, http.client.HTTPException) as err:
        raise ParticleError(f"cannot talk to the registry at {parts.netloc}: {err}") from err
    finally:
        if stream is not None:
            stream.close()
        conn.close()


def _plain_request(method: str, url: str, ok: tuple[int, ...]) -> Response:
    r = _http(method, url, None, {"User-Agent": "particleos"})
    if r.status not in ok:
        raise ParticleError(f"{urllib.parse.urlsplit(url).netloc}: {method}: {_describe(r)}")
    return r


def _parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """`Bearer realm="...",service="...",scope="..."` -> ("bearer", {realm: ..., ...})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {k.lower(): v for k, v in re.findall(r'(\w+)="([^"]*)"', rest)}
    return scheme.lower(), params


def _describe(r: Response) -> str:
    """HTTP status plus the registry's own error message (distribution's JSON errors)."""
    text = f"HTTP {r.status}"
    try:
        errors = json.loads(r.body).get("errors") or []
        if errors:
            e = errors[0]
            text += f" {e.get('code', '')}: {e.get('message', '')}"
    except (ValueError, AttributeError):
        pass
    return text
