"""OCI registries for real: Debian's docker-registry (Docker's distribution) on 127.0.0.1, with
and without htpasswd authentication. `particle push` of two versions (the second uploads only
the blobs that changed: our counters and the registry's own access log and storage say so),
tags and manifests resolve, blobs come back byte for byte, a wrong password is a message.
The container export (one real build) runs a program of the image with podman."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from particleos.errors import ParticleError
from particleos.formats import OCI_ARTIFACT_TYPE, OCI_TITLE, oci_version_tag, parse_sha256sums
from particleos.oci import artifact
from particleos.oci.registry import Credentials, Reference, Registry, find_credentials

from .conftest import BuildFn
from .registryserver import (
    PASSWORD,
    REGISTRY_BIN,
    USER,
    RegistryServer,
    TokenService,
    fake_build,
    needs_registry,
    start_registry,
)

ID = "demo"


@pytest.fixture(scope="module")
def open_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    if REGISTRY_BIN is None:
        pytest.skip("docker-registry is not installed")
    yield from start_registry(tmp_path_factory.mktemp("reg") / "open", htpasswd=False)


@pytest.fixture(scope="module")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    if REGISTRY_BIN is None:
        pytest.skip("docker-registry is not installed")
    yield from start_registry(tmp_path_factory.mktemp("reg") / "auth", htpasswd=True)


def run_cli(*args: str, stdin: str | None = None, env: dict[str, str] | None = None) \
        -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "particleos", *args], input=stdin,
                          capture_output=True, text=True, check=False,
                          env={**os.environ, **(env or {})})


@needs_registry
def test_push_two_versions_uploads_only_what_changed(tmp_path: Path,
                                                     open_registry: RegistryServer) -> None:
    uki = os.urandom(300_000)  # the same kernel in both versions
    v1 = fake_build(tmp_path / "out1", "1.0", usr=os.urandom(1_000_000), uki=uki)
    v2 = fake_build(tmp_path / "out2", "1.1", usr=os.urandom(1_000_000), uki=uki)
    target = f"{open_registry.host}/fleet/demo"

    proc = run_cli("push", str(v1), target, "--json")
    assert proc.returncode == 0, proc.stderr
    first = json.loads(proc.stdout)
    assert first["tags"] == ["1.0", "latest"] and first["skipped_blobs"] == 0
    # config, verity, usr, uki, manifest, SHA256SUMS
    assert first["uploaded_blobs"] == 6
    after_v1 = open_registry.stored_blobs()
    uploads_v1 = [r for r in open_registry.access_log() if r[0] == "PUT" and "/blobs/" in r[1]]
    assert len(uploads_v1) == 6

    proc = run_cli("push", str(v2), target, "--json")
    assert proc.returncode == 0, proc.stderr
    second = json.loads(proc.stdout)
    # The UKI and the empty config are already there: only the 4 changed blobs travel.
    assert second["uploaded_blobs"] == 4
    assert sorted(second["skipped"]) == sorted([artifact.EMPTY_CONFIG, "demo_1.1.efi"])
    assert second["skipped_bytes"] == 300_000 + 2
    uploads = [r for r in open_registry.access_log() if r[0] == "PUT" and "/blobs/" in r[1]]
    assert len(uploads) - len(uploads_v1) == 4  # the registry's own count
    assert len(open_registry.stored_blobs() - after_v1) == 4 + 1  # + the manifest itself

    # A machine's view: tags resolve, the manifest names every file, blobs are the files.
    reg = Registry(Reference.parse(target))
    assert set(reg.tags()) == {"1.0", "1.1", "latest"}
    body, digest = reg.get_manifest("latest")
    assert digest == second["digest"] == reg.get_manifest("1.1")[1]
    doc = json.loads(body)
    assert doc["artifactType"] == OCI_ARTIFACT_TYPE
    assert doc["config"]["mediaType"] == "application/vnd.oci.empty.v1+json"
    assert doc["annotations"]["org.opencontainers.image.version"] == "1.1"
    layers = {d["annotations"][OCI_TITLE]: d for d in doc["layers"]}
    uuid_names = [n for n in layers if n.endswith(".usr.raw")]
    assert len(uuid_names) == 1 and re.match(r"demo_1\.1_[0-9a-f-]{36}\.usr\.raw", uuid_names[0])
    assert layers[uuid_names[0]]["mediaType"] == "application/vnd.particleos.usr.erofs.v1"
    assert layers["demo_1.1.efi"]["mediaType"] == "application/vnd.particleos.uki.v1"
    sums = parse_sha256sums(reg.get_blob(layers["SHA256SUMS"]["digest"]).decode())
    for name, d in layers.items():
        if name != "SHA256SUMS":
            assert d["digest"] == f"sha256:{sums[name]}"
    assert reg.get_blob(layers["demo_1.1.efi"]["digest"]) == uki
    assert reg.get_blob(layers[uuid_names[0]]["digest"]) == (v2 / "demo_1.1.usr.raw").read_bytes()

    # Pushing the same version again uploads nothing and gives the same manifest digest.
    proc = run_cli("push", str(v2), target, "--json")
    again = json.loads(proc.stdout)
    assert again["uploaded_blobs"] == 0 and again["digest"] == second["digest"]


@needs_registry
def test_push_with_basic_auth_and_signed_index(tmp_path: Path, auth_registry: RegistryServer,
                                               repo: Path) -> None:
    build = fake_build(tmp_path / "out", "2", usr=b"usr two", uki=b"MZ two")
    target = f"{auth_registry.host}/fleet/os:stable"

    proc = run_cli("push", str(build), target, env={"REGISTRY_AUTH_FILE": str(tmp_path / "no")})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "needs credentials" in proc.stderr

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"auths": {auth_registry.host: {
        "auth": base64.b64encode(f"{USER}:wrong".encode()).decode()}}}))
    proc = run_cli("push", str(build), target, env={"REGISTRY_AUTH_FILE": str(bad)})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"refused the credentials of '{USER}' (from {bad})" in proc.stderr

    # The key signs the version's SHA256SUMS; the signature travels as a blob.
    from particleos.keys import genkey
    keys = genkey(tmp_path / "keys", "test owner", days=30)
    good = tmp_path / "config.json"
    good.write_text(json.dumps({"auths": {f"https://{auth_registry.host}": {
        "auth": base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}}}))
    proc = run_cli("push", str(build), target, "--openpgp-key", str(keys.openpgp_key),
                   env={"REGISTRY_AUTH_FILE": str(tmp_path / "no"),
                        "DOCKER_CONFIG": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert "pushed demo 2" in proc.stdout and "(2, stable)" in proc.stdout

    creds = find_credentials(auth_registry.host, [good])
    assert creds == Credentials(USER, PASSWORD, str(good))
    with pytest.raises(ParticleError, match="needs credentials"):
        Registry(Reference.parse(target)).tags()
    reg = Registry(Reference.parse(target), credentials=creds)
    doc = json.loads(reg.get_manifest("stable")[0])
    layers = {d["annotations"][OCI_TITLE]: d for d in doc["layers"]}
    assert layers["SHA256SUMS.gpg"]["mediaType"] == "application/pgp-signature"
    (tmp_path / "SHA256SUMS").write_bytes(reg.get_blob(layers["SHA256SUMS"]["digest"]))
    (tmp_path / "SHA256SUMS.gpg").write_bytes(reg.get_blob(layers["SHA256SUMS.gpg"]["digest"]))
    from particleos.openpgp import verify
    assert verify(keys.openpgp_public, tmp_path / "SHA256SUMS", tmp_path / "SHA256SUMS.gpg")

    # Explicit credentials on stdin, too.
    proc = run_cli("push", str(build), target, "--username", USER, "--password-stdin",
                   stdin=PASSWORD + "\n", env={"REGISTRY_AUTH_FILE": str(tmp_path / "no")})
    assert proc.returncode == 0, proc.stderr
    assert "uploaded: 0 blobs" in proc.stdout


def test_references_and_tags() -> None:
    assert Reference.parse("oci://127.0.0.1:5000/a/b:v1") == Reference("127.0.0.1:5000", "a/b",
                                                                      "v1")
    assert Reference.parse("docker.io/debian") == Reference("docker.io", "library/debian")
    for bad in ("just-a-name", "reg.example.org/UPPER", "reg.example.org/a@sha256:00"):
        with pytest.raises(ParticleError):
            Reference.parse(bad)
    assert oci_version_tag("2.0~rc1") == "2.0_rc1"
    assert oci_version_tag("1.0") == "1.0"


def podman(storage: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """podman with its own storage under the test's directory. runc and cgroupfs: crun refuses
    the hybrid cgroup v1 hierarchy of containers in containers, and runc runs with either
    hierarchy; the explicit ulimits avoid raising limits beyond what an unprivileged
    container host allows."""
    return subprocess.run(
        ["podman", "--root", str(storage / "root"), "--runroot", str(storage / "run"),
         "--storage-driver", "vfs", "--runtime", "runc", "--cgroup-manager", "cgroupfs",
         *args], capture_output=True, text=True, check=False, timeout=600)


@pytest.mark.slow
@needs_registry
@pytest.mark.skipif(shutil.which("podman") is None or shutil.which("skopeo") is None,
                    reason="podman and skopeo are not installed (scripts/setup)")
def test_export_runs_with_podman_and_pushes(build_image: BuildFn, tmp_path: Path,
                                            open_registry: RegistryServer) -> None:
    built = build_image("bootcheck", "1.0.0")
    layout = tmp_path / "image"
    target = f"{open_registry.host}/fleet/os-container"
    proc = run_cli("oci", "export", str(built.disk.parent), "--output", str(layout),
                   "--to", target, "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["pushed"]["tags"] == ["1.0.0", "latest"]

    # podman runs a program of the image's /usr, with the factory /etc in place.
    # (podman refuses a run root path longer than 50 characters: a short one under /tmp.)
    storage = Path(tempfile.mkdtemp(prefix="particle-podman-"))
    try:
        run = podman(storage, "run", "--rm", "--network=none",
                     "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024",
                     f"oci:{layout}:1.0.0", "sh", "-c",
                     "cat /usr/lib/os-release && stat -c '%U %a' /etc/shadow")
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    assert run.returncode == 0, run.stderr
    assert 'IMAGE_VERSION="1.0.0"' in run.stdout and "PARTICLE_ID=" in run.stdout
    assert "root 640" in run.stdout

    # The registry has the same image (same manifest digest), as skopeo sees it.
    inspect = subprocess.run(["skopeo", "inspect", "--tls-verify=false",
                              f"docker://{target}:1.0.0"], capture_output=True, text=True,
                             check=False, timeout=120)
    assert inspect.returncode == 0, inspect.stderr
    info = json.loads(inspect.stdout)
    assert info["Digest"] == result["digest"] and info["Architecture"] == "amd64"

    # A second export of the same build is the same image: nothing to upload.
    proc = run_cli("oci", "export", str(built.disk.parent), "--to", target, "--json")
    assert proc.returncode == 0, proc.stderr
    again = json.loads(proc.stdout)
    assert again["digest"] == result["digest"] and again["pushed"]["uploaded_blobs"] == 0


@needs_registry
def test_push_with_bearer_tokens(tmp_path: Path) -> None:
    tokens = TokenService(tmp_path)
    auth = (f"auth:\n  token:\n    realm: {tokens.realm}\n    service: particle-test\n"
            f"    issuer: particle-test-issuer\n    rootcertbundle: {tokens.bundle}\n")
    try:
        server = start_registry(tmp_path / "reg", htpasswd=False, auth=auth)
        registry = next(server)
        build = fake_build(tmp_path / "out", "3", usr=b"usr three", uki=b"MZ three")
        target = f"{registry.host}/fleet/tokens"
        proc = run_cli("push", str(build), target, "--username", USER, "--password-stdin",
                       "--json", stdin="wrong\n")
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert f"refused the credentials of '{USER}'" in proc.stderr
        proc = run_cli("push", str(build), target, "--username", USER, "--password-stdin",
                       "--json", stdin=PASSWORD + "\n")
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["uploaded_blobs"] == 6
        assert tokens.scopes == ["repository:fleet/tokens:pull,push"]
        # Without credentials the registry still asks for a token: anonymous is refused.
        with pytest.raises(ParticleError, match="refused anonymous access"):
            Registry(Reference.parse(target)).tags()
        creds = Credentials(USER, PASSWORD, "test")
        assert set(Registry(Reference.parse(target), credentials=creds).tags()) == {"3",
                                                                                   "latest"}
        next(server, None)
    finally:
        tokens.server.shutdown()


def test_publish_to_a_registry_names_push(tmp_path: Path) -> None:
    build = fake_build(tmp_path / "out", "4", usr=b"usr", uki=b"MZ")
    proc = run_cli("publish", str(build), "oci://127.0.0.1:5000/fleet/os")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"hint: particle push {build} 127.0.0.1:5000/fleet/os" in proc.stderr
    assert not (Path.cwd() / "oci:").exists()
