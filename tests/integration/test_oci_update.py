"""Updates from an OCI registry for real: Debian's docker-registry on 127.0.0.1 (htpasswd or
a Bearer token service), versions pushed with `particle push`, and the machine side
(`particleos.machine.registry`: curl, gpgv) fetching and verifying them.

The fast tests run the machine's client on the host against the registry: the newest version
among tags (moving tags ignored), Basic and Bearer authentication from an auth.json, the files
it leaves for sysupdate, and the refusals (another key, no signature, a blob changed in the
registry's storage), each leaving nothing to install. The slow test drives one machine built
with `[update] source = "oci+http://..."` through QEMU's guestfwd relay: v1 boots, a v3 signed
by another key and a v2 whose UKI blob was corrupted in the registry are refused with nothing
installed, then `particle update --reboot` lands v2 in the other slot, counted and blessed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from particleos import openpgp, runner
from particleos.builder import BuildResult
from particleos.keys import KeyFiles, genkey
from particleos.machine import registry as machine_registry
from particleos.machine.cli import MachineError
from particleos.oci import artifact
from particleos.oci.registry import Credentials
from particleos.verity import verity_uuids
from particleos.vm import VM, VMOptions

from .conftest import BuildFn
from .guestshell import GuestShell
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
from .relay import user_nic

needs_curl_gpgv = pytest.mark.skipif(shutil.which("curl") is None or shutil.which("gpgv") is None,
                                     reason="curl and gpgv are needed (scripts/setup)")
REPO = "fleet/demo"
CREDS = Credentials(USER, PASSWORD, "test")


@dataclass
class Keys:
    owner: KeyFiles
    other: KeyFiles
    ring: Path  # the owner's public keyring, as an image carries it


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    d = tmp_path_factory.mktemp("keys")
    owner = genkey(d / "owner", "ParticleOS test owner", days=30)
    other = genkey(d / "other", "Someone else", days=30)
    ring = d / "import-pubring.gpg"
    ring.write_bytes(openpgp.public_keyring(owner.openpgp_key))
    return Keys(owner, other, ring)


@pytest.fixture(scope="module")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    if REGISTRY_BIN is None:
        pytest.skip("docker-registry is not installed")
    yield from start_registry(tmp_path_factory.mktemp("reg") / "auth", htpasswd=True)


def auth_file(path: Path, host: str, user: str = USER, password: str = PASSWORD) -> Path:
    """What an owner writes to /etc/particle/auth.json (podman's auth.json format)."""
    raw = base64.b64encode(f"{user}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {host: {"auth": raw}}}))
    return path


def blob_file(server: RegistryServer, digest: str) -> Path:
    """Where docker-registry's filesystem storage keeps a blob's bytes."""
    hexd = digest.removeprefix("sha256:")
    return server.storage / f"docker/registry/v2/blobs/sha256/{hexd[:2]}/{hexd}/data"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def corrupt(path: Path) -> bytes:
    """Flip bytes in the middle of a stored blob (same size: the registry serves it as is);
    returns the original bytes."""
    original = path.read_bytes()
    mid = len(original) // 2
    path.write_bytes(original[:mid] + bytes(b ^ 0xFF for b in original[mid : mid + 16])
                     + original[mid + 16 :])
    return original


@needs_registry
@needs_curl_gpgv
def test_machine_client_fetches_the_newest_signed_version_and_refuses_the_rest(
        tmp_path: Path, auth_registry: RegistryServer, keys: Keys) -> None:
    target = f"{auth_registry.host}/{REPO}"
    builds = {v: fake_build(tmp_path / f"out-{v}", v, usr=os.urandom(300_000),
                            uki=os.urandom(100_000)) for v in ("1.0", "1.1", "1.2")}
    owner_sign = openpgp.signer(keys.owner.openpgp_key)
    artifact.push(builds["1.0"], target, sign=owner_sign, credentials=CREDS)
    # 1.1 is also tagged with moving tags, one of which sorts above every version.
    artifact.push(builds["1.1"], target, sign=owner_sign, credentials=CREDS)
    artifact.push(builds["1.1"], target + ":9-stable", sign=owner_sign, credentials=CREDS)
    source = machine_registry.parse_source(f"oci+http://{target}")
    incoming = tmp_path / "incoming"
    lines: list[str] = []

    def fetch(running: str, installed: tuple[str, ...] = (), **kw: object) -> str | None:
        args: dict[str, object] = {"source": source, "image_id": "demo", "keyring": keys.ring,
                                   "auth_files": [tmp_path / "auth.json"], "log": lines.append,
                                   **kw}
        return machine_registry.fetch(running, installed, incoming, **args)  # type: ignore[arg-type]

    with pytest.raises(MachineError, match="needs credentials and none were found"):
        fetch("1.0")
    auth_file(tmp_path / "auth.json", auth_registry.host, password="wrong")
    with pytest.raises(MachineError, match=f"refused the credentials of '{USER}'"):
        fetch("1.0")
    auth_file(tmp_path / "auth.json", auth_registry.host)

    assert fetch("1.0", ("1.0",)) == "1.1"
    got = {p.name: sha256(p) for p in incoming.iterdir()}
    uuid = r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}"
    assert sorted(re.sub(uuid, "UUID", n) for n in got) == [
        "demo_1.1.efi", "demo_1.1_UUID.usr-verity.raw", "demo_1.1_UUID.usr.raw"]
    # The bytes pushed, under the served names that sysupdate's patterns take.
    assert sorted(got.values()) == sorted(sha256(builds["1.1"] / f"demo_1.1{suffix}")
                                          for suffix in (".efi", ".usr-verity.raw", ".usr.raw"))
    assert any("SHA256SUMS is signed by" in line for line in lines)
    assert "9-stable" not in " ".join(lines)

    # Nothing newer, or the newest already installed: nothing is fetched, nothing left.
    assert fetch("1.1") is None and not list(incoming.iterdir())
    assert fetch("1.0", ("1.1",)) is None and not list(incoming.iterdir())

    # 1.2 signed by another key: refused before any file is downloaded.
    artifact.push(builds["1.2"], target, sign=openpgp.signer(keys.other.openpgp_key),
                  credentials=CREDS, moving_tag=None)
    before = len(auth_registry.access_log())
    with pytest.raises(machine_registry.Refused,
                       match=r"refusing 1\.2 .*signed by a key this machine does not trust.*"
                             "nothing was installed"):
        fetch("1.0")
    assert not list(incoming.iterdir())
    big = [r for r in auth_registry.access_log()[before:] if "/blobs/" in r[1]]
    assert len(big) == 2  # SHA256SUMS and its signature only

    # 1.2 unsigned: refused.
    artifact.push(builds["1.2"], target, credentials=CREDS, moving_tag=None)
    with pytest.raises(machine_registry.Refused, match="SHA256SUMS is not signed"):
        fetch("1.0")

    # 1.2 signed by the owner, but its UKI blob changed in the registry's storage.
    artifact.push(builds["1.2"], target, sign=owner_sign, credentials=CREDS, moving_tag=None)
    uki = blob_file(auth_registry, "sha256:" + sha256(builds["1.2"] / "demo_1.2.efi"))
    original = corrupt(uki)
    with pytest.raises(machine_registry.Refused, match=r"demo_1\.2\.efi: the registry sent "
                                                       "content with sha256:"):
        fetch("1.0")
    assert not list(incoming.iterdir())  # the usr and verity files that did check out: gone
    uki.write_bytes(original)
    assert fetch("1.0") == "1.2"


@needs_registry
@needs_curl_gpgv
def test_machine_client_with_bearer_tokens(tmp_path: Path, keys: Keys) -> None:
    tokens = TokenService(tmp_path)
    auth = (f"auth:\n  token:\n    realm: {tokens.realm}\n    service: particle-test\n"
            f"    issuer: particle-test-issuer\n    rootcertbundle: {tokens.bundle}\n")
    server = start_registry(tmp_path / "reg", htpasswd=False, auth=auth)
    try:
        reg = next(server)
        build = fake_build(tmp_path / "out", "3", usr=b"usr three", uki=b"MZ three")
        artifact.push(build, f"{reg.host}/fleet/tokens", credentials=CREDS,
                      sign=openpgp.signer(keys.owner.openpgp_key))
        source = machine_registry.parse_source(f"oci+http://{reg.host}/fleet/tokens")
        client = machine_registry.Client(source, tmp_path / "work")
        with pytest.raises(MachineError, match="refused anonymous access to fleet/tokens"):
            client.tags()
        assert machine_registry.fetch(
            "2", [], tmp_path / "incoming", source=source, image_id="demo", keyring=keys.ring,
            auth_files=[auth_file(tmp_path / "auth.json", reg.host)], log=print) == "3"
        assert "repository:fleet/tokens:pull" in tokens.scopes  # pull only, never push
        assert len(list((tmp_path / "incoming").iterdir())) == 3
    finally:
        next(server, None)
        tokens.server.shutdown()


# --------------------------------------------------------------------------- a real machine

ID = "particle-minimal"
V1, V2, V3 = "4.0.1", "4.0.2", "4.0.3"
MACHINE_REPO = "fleet/particle"  # tests/integration/specs/ociupdate: oci+http://10.0.2.100/...
BOOT_TIMEOUT = 600


@pytest.mark.slow
@needs_registry
def test_machine_updates_from_the_registry_and_refuses_what_does_not_check_out(
        build_image: BuildFn, keys: Keys, auth_registry: RegistryServer,
        tmp_path: Path) -> None:
    def build(version: str) -> BuildResult:
        return build_image("ociupdate", version,
                           overrides=[f"signing.openpgp_key={keys.owner.openpgp_key}"])

    v1, v2 = build(V1), build(V2)
    target = f"{auth_registry.host}/{MACHINE_REPO}"
    sign = openpgp.signer(keys.owner.openpgp_key)
    artifact.push(v1.output_dir, target, sign=sign, credentials=CREDS)
    t0 = time.monotonic()
    pushed = artifact.push(v2.output_dir, target, sign=sign, credentials=CREDS)
    print(f"\npush of v2: {pushed.uploaded_bytes} bytes in {time.monotonic() - t0:.1f} s")
    disk = tmp_path / "disk.raw"
    runner.run(["cp", "--sparse=always", v1.disk, disk], what="copy of the v1 disk")
    port = int(auth_registry.host.rsplit(":", 1)[1])
    vm = VM(disk, VMOptions(nic=[user_nic(port)], vars_file=tmp_path / "efivars.fd",
                            log=tmp_path / "console.log")).start()
    try:
        sh = GuestShell(vm)
        sh.login(BOOT_TIMEOUT)
        st = sh.json("particle status --json")
        assert st["version"] == V1 and st["running_slot"] == "A"
        assert st["update_source"] == f"oci+http://10.0.2.100/{MACHINE_REPO}"
        # Only the local transfers: sysupdate never talks to the registry itself.
        assert sh.out("ls /usr/lib/sysupdate.d 2>/dev/null | wc -l") == "0"
        assert "30-uki.transfer" in sh.out("ls /usr/lib/particle/sysupdate.local.d")
        # Debian's automatic sysupdate has nothing to do: skipped, not failed (no degraded).
        sh.run("systemctl start systemd-sysupdate.service")
        assert sh.out("systemctl show -P ConditionResult systemd-sysupdate.service") == "no"
        assert sh.out("systemctl --failed --no-legend --plain") == ""

        rc, out = sh.run("particle update --check", check=False)
        assert rc == 1 and "10.0.2.100 needs credentials" in out and "Traceback" not in out
        creds = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        sh.run("mkdir -p /etc/particle && echo '{\"auths\": {\"10.0.2.100\": {\"auth\": \""
               + creds + "\"}}}' > /etc/particle/auth.json && chmod 600 /etc/particle/auth.json")
        assert f"update available: {V2} (running {V1})" in sh.out("particle update --check")

        def nothing_installed(out: str) -> None:
            assert "nothing was installed" in out and "Traceback" not in out
            st = sh.json("particle status --json")
            assert [e["version"] for e in st["entries"]] == [V1]
            assert [s["state"] for s in st["slots"]] == ["running", "empty"]
            assert sh.out("ls -A /var/lib/particle/incoming") == ""

        # A v3 whose SHA256SUMS is signed by another key: refused before any big download.
        fake = fake_build(tmp_path / "v3", V3, usr=os.urandom(200_000), uki=b"MZ" * 1000,
                          image_id=ID)
        artifact.push(fake, target, sign=openpgp.signer(keys.other.openpgp_key),
                      credentials=CREDS, moving_tag=None)
        rc, out = sh.run("particle update", check=False, timeout=300)
        assert rc == 1, out
        assert f"refusing {V3}" in out and "signed by a key this machine does not trust" in out
        nothing_installed(out)
        shutil.rmtree(auth_registry.storage / "docker/registry/v2/repositories" / MACHINE_REPO
                      / "_manifests/tags" / V3)  # the owner takes the tag down

        # v2 with its UKI changed in the registry's storage: every other file checks out
        # and is downloaded, the UKI does not, and nothing reaches sysupdate.
        uki = next(p for p in v2.output_dir.iterdir() if p.name == f"{ID}_{V2}.efi")
        stored = blob_file(auth_registry, "sha256:" + sha256(uki))
        original = corrupt(stored)
        rc, out = sh.run("particle update", check=False, timeout=900)
        assert rc == 1, out
        assert f"{ID}_{V2}.efi: the registry sent content with sha256:" in out
        assert re.search(rf"{ID}_{V2}_[0-9a-f-]{{36}}\.usr\.raw: .* sha256 ok", out), out
        nothing_installed(out)
        stored.write_bytes(original)

        # The good v2: fetched, verified, installed by sysupdate into slot B, booted, blessed.
        mark = len(vm.text())
        sh.start("particle update --reboot")
        vm.expect(r"particle: switching now", 900)
        log = vm.text()[mark:]
        sh.login(BOOT_TIMEOUT)
        assert "SHA256SUMS is signed by" in log
        assert f"Successfully installed update '{V2}'" in log
        assert f"{ID}_{V2}+2-0.efi" in log  # the new UKI starts with its boot counter
        if m := re.search(r"downloading 3 files, ([\d.]+) MiB", log):
            print(f"registry update: {m.group(1)} MiB; " + "; ".join(
                re.findall(r"\.(?:usr|usr-verity)\.raw: [\d.]+ MiB in [\d.]+ s|\.efi: [\d.]+ "
                           r"MiB in [\d.]+ s", log)))
        st = sh.json("particle status --json")
        assert st["version"] == V2 and st["running_slot"] == "B"
        usr_uuid, verity_uuid = verity_uuids(bytes.fromhex(v2.root_hash))
        slot_b = next(s for s in st["slots"] if s["slot"] == "B")
        assert slot_b["label"] == f"{ID}_{V2}" and slot_b["usr_uuid"] == str(usr_uuid)
        assert slot_b["verity_uuid"] == str(verity_uuid)
        new = next(e for e in st["entries"] if e["version"] == V2)
        assert new["booted"] and new["default"] and new["state"] == "good"  # blessed
        assert new["file"] == f"{ID}_{V2}.efi"
        assert st["boot_assessment"]["marked_good"]
        assert sh.out("ls -A /var/lib/particle/incoming") == ""
        assert f"up to date: {V2}" in sh.out("particle update --check")
    finally:
        vm.close()
