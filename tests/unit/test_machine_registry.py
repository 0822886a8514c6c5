"""The pure parts of updates from an OCI registry (particleos.machine.registry): the source
spelling, which tag is the newest version, the authentication challenge, where credentials
come from, which layers are fetched and what the signed index must agree with, the gpgv check
with real keys; and what the spec check and the builder do with an `oci://` source."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from particleos import openpgp
from particleos.builder.bootstrap import extra_packages
from particleos.builder.context import BuildContext
from particleos.builder.updates import update_definitions
from particleos.formats import OCI_ARTIFACT_TYPE, OCI_ID, OCI_TITLE, OCI_VERSION, is_oci
from particleos.machine import registry
from particleos.machine.cli import MachineError
from particleos.machine.registry import Layer, Refused, Source
from particleos.spec import load_spec
from particleos.tools import ToolsTree

from .conftest import Run

needs_gpg = pytest.mark.skipif(shutil.which("gpg") is None or shutil.which("gpgv") is None,
                               reason="gnupg and gpgv not installed")
UUID = "0123abcd-0123-4567-89ab-0123456789ab"


def test_sources_and_what_is_wrong_with_them() -> None:
    assert registry.parse_source("oci://registry.example.org/fleet/web") == \
        Source("https", "registry.example.org", "fleet/web")
    assert registry.parse_source("oci+http://10.0.2.100:5000/os/") == \
        Source("http", "10.0.2.100:5000", "os")
    assert registry.parse_source("oci://docker.io/debian").repository == "library/debian"
    assert str(registry.parse_source("oci+http://10.0.2.100/os")) == "oci+http://10.0.2.100/os"
    for bad, why in (("oci://reg.example.org/Fleet", "not a repository name"),
                     ("oci://reg.example.org/fleet:latest", "without a tag or digest"),
                     ("oci://reg.example.org/fleet@sha256:00", "without a tag or digest"),
                     ("oci:///fleet", "is not a registry host"),
                     ("oci://reg.example.org/", "not a repository name"),
                     ("docker://reg.example.org/fleet", "not a registry source")):
        with pytest.raises(ValueError, match=why):
            registry.parse_source(bad)
    assert is_oci("oci+http://x/y") and not is_oci("https://x/y")


def test_challenges() -> None:
    assert registry.parse_challenge(
        'Bearer realm="https://auth.example.org/token",service="registry.example.org",'
        'scope="repository:fleet/os:pull"') == ("bearer", {
            "realm": "https://auth.example.org/token", "service": "registry.example.org",
            "scope": "repository:fleet/os:pull"})
    assert registry.parse_challenge('Basic realm="particle-test"') == \
        ("basic", {"realm": "particle-test"})
    assert registry.parse_challenge("basic realm=plain, charset=UTF-8") == \
        ("basic", {"realm": "plain", "charset": "UTF-8"})


def test_headers_of_the_last_response_after_a_redirect() -> None:
    text = ("HTTP/1.1 307 Temporary Redirect\r\nLocation: https://storage/x\r\n\r\n"
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nDocker-Content-Digest: sha256:ab\r\n\r\n")
    assert registry.parse_headers(text) == {"content-length": "3",
                                            "docker-content-digest": "sha256:ab"}


def auth(path: Path, entries: dict[str, str]) -> Path:
    path.write_text(json.dumps({"auths": {
        host: {"auth": base64.b64encode(up.encode()).decode()} for host, up in entries.items()}}))
    return path


def test_credentials_come_from_the_first_file_that_names_the_registry(tmp_path: Path) -> None:
    particle = auth(tmp_path / "particle.json", {"other.example.org": "a:b"})
    containers = auth(tmp_path / "containers.json", {"https://reg.example.org": "fleet:pw:x"})
    later = auth(tmp_path / "later.json", {"reg.example.org": "late:comer"})
    files = [tmp_path / "missing.json", particle, containers, later]
    found = registry.find_credentials("reg.example.org", files)
    assert found == registry.Credentials("fleet", "pw:x", str(containers))
    assert found is not None and found.basic() == "Basic " + base64.b64encode(
        b"fleet:pw:x").decode()
    assert registry.find_credentials("none.example.org", files) is None
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"auths": {"reg.example.org": {"auth": "bm8tY29sb24="}}}))
    with pytest.raises(MachineError, match="is not base64 of user:password"):
        registry.find_credentials("reg.example.org", [broken])
    broken.write_text("{not json")
    with pytest.raises(MachineError, match="cannot read registry credentials"):
        registry.find_credentials("reg.example.org", [broken])


def manifest(version: str, image_id: str = "demo") -> tuple[dict[str, Any], str]:
    return ({"artifactType": OCI_ARTIFACT_TYPE,
             "annotations": {OCI_VERSION: version, OCI_ID: image_id}}, f"sha256:{version}")


def test_the_newest_version_among_the_tags() -> None:
    manifests = {"latest": manifest("1.10"), "stable": manifest("1.9"), "1.9": manifest("1.9"),
                 "1.10": manifest("1.10"), "1.2": manifest("1.2"),
                 "9-beta": manifest("1.10"),  # a moving tag with a digit: its version is 1.10
                 "7.0": manifest("7.0", image_id="another-image")}
    asked: list[str] = []

    def manifest_of(tag: str) -> tuple[dict[str, Any], str]:
        asked.append(tag)
        return manifests[tag]

    found = registry.choose(manifests, manifest_of, "demo", "1.2")
    assert found is not None and (found.version, found.tag) == ("1.10", "1.10")
    assert asked == ["9-beta", "7.0", "1.10"]  # newest first; latest/stable never asked
    assert registry.choose(manifests, manifest_of, "demo", "1.10") is None
    # `2.0~rc1` is tagged 2.0_rc1: its manifest gives the exact version, older than 2.0.
    manifests |= {"2.0_rc1": manifest("2.0~rc1")}
    found = registry.choose(manifests, manifest_of, "demo", "1.2")
    assert found is not None and found.version == "2.0~rc1"
    manifests |= {"2.0": manifest("2.0")}
    found = registry.choose(manifests, manifest_of, "demo", "2.0~rc1")
    assert found is not None and found.version == "2.0"
    assert registry.choose(manifests, manifest_of, "demo", "2.0") is None
    # Not a ParticleOS version artifact: not a version.
    manifests = {"3.0": ({"annotations": {OCI_VERSION: "3.0", OCI_ID: "demo"}}, "sha256:x")}
    assert registry.choose(manifests, manifest_of, "demo", "1.0") is None


def layer(title: str, digest: str = "sha256:" + "a" * 64, size: int = 10) -> dict[str, Any]:
    return {"mediaType": "x", "digest": digest, "size": size,
            "annotations": {OCI_TITLE: title}}


def version_doc(*titles: str) -> dict[str, Any]:
    return {"layers": [layer(t, "sha256:" + f"{i:064x}") for i, t in enumerate(titles)]}


FILES = (f"demo_2_{UUID}.usr-verity-sig.raw", f"demo_2_{UUID}.usr-verity.raw",
         f"demo_2_{UUID}.usr.raw", "demo_2.efi")


def test_what_is_fetched_and_what_is_refused() -> None:
    p = registry.plan(version_doc(*FILES, "demo_2.manifest.json", "demo-tools_2.raw",
                                  "SHA256SUMS", "SHA256SUMS.gpg"), "demo", "2")
    assert [f.title for f in p.files] == list(FILES)  # in install order, the UKI last
    assert (p.sums.title, p.signature.title) == ("SHA256SUMS", "SHA256SUMS.gpg")
    unsigned = version_doc(*FILES, "SHA256SUMS")
    with pytest.raises(Refused, match="SHA256SUMS is not signed"):
        registry.plan(unsigned, "demo", "2")
    with pytest.raises(Refused, match=r"no demo_2\*\.efi layer"):  # only another version's
        registry.plan(version_doc(*FILES[:3], "demo_3.efi", "SHA256SUMS", "SHA256SUMS.gpg"),
                      "demo", "2")
    with pytest.raises(Refused, match=r"no demo_2\*\.usr\.raw layer"):  # a path is no name
        registry.plan(version_doc(f"../demo_2_{UUID}.usr.raw", FILES[1], FILES[3],
                                  "SHA256SUMS", "SHA256SUMS.gpg"), "demo", "2")
    with pytest.raises(Refused, match=r"two layers named demo_2\.efi"):
        registry.plan(version_doc(*FILES, "demo_2.efi", "SHA256SUMS", "SHA256SUMS.gpg"),
                      "demo", "2")
    doc = version_doc(*FILES, "SHA256SUMS", "SHA256SUMS.gpg")
    doc["layers"][0]["digest"] = "sha512:00"
    with pytest.raises(Refused, match="malformed"):
        registry.plan(doc, "demo", "2")


def test_the_signed_index_must_list_each_file_with_its_manifest_digest() -> None:
    files = [Layer("demo_2.efi", "sha256:" + "1" * 64, 5),
             Layer(f"demo_2_{UUID}.usr.raw", "sha256:" + "2" * 64, 5)]
    assert registry.check_index(files, {"demo_2.efi": "1" * 64,
                                        f"demo_2_{UUID}.usr.raw": "2" * 64}) == []
    assert registry.check_index(files, {"demo_2.efi": "3" * 64}) == [
        f"demo_2.efi: the manifest says sha256:{'1' * 64}, the signed SHA256SUMS "
        f"sha256:{'3' * 64}",
        f"demo_2_{UUID}.usr.raw is not listed in the signed SHA256SUMS",
    ]


@needs_gpg
def test_gpgv_against_the_image_keyring(tmp_path: Path) -> None:
    owner_secret, owner_public = openpgp.generate("Owner <owner@example.org>")
    other_secret, _ = openpgp.generate("Other <other@example.org>")
    (tmp_path / "owner.asc").write_bytes(owner_secret)
    (tmp_path / "other.asc").write_bytes(other_secret)
    ring = tmp_path / "import-pubring.gpg"
    ring.write_bytes(owner_public)
    data = tmp_path / "SHA256SUMS"
    data.write_text(f"{'1' * 64}  demo_2.efi\n")
    sig = openpgp.sign_detached(tmp_path / "owner.asc", data)
    fpr = registry.verify_signature(data, sig, ring, tmp_path / "home")
    assert fpr == openpgp.fingerprints(ring)[0]
    data.write_text(f"{'2' * 64}  demo_2.efi\n")
    with pytest.raises(Refused, match="the signature does not match it"):
        registry.verify_signature(data, sig, ring, tmp_path / "home")
    openpgp.sign_detached(tmp_path / "other.asc", data)
    with pytest.raises(Refused, match="signed by a key this machine does not trust"):
        registry.verify_signature(data, sig, ring, tmp_path / "home")
    with pytest.raises(Refused, match="no key to check updates with"):
        registry.verify_signature(data, sig, tmp_path / "none.gpg", tmp_path / "home")


def spec_problems(run: Run, tmp_path: Path, text: str) -> tuple[int, list[str]]:
    (tmp_path / "particle.toml").write_text(text)
    code, _, err = run("validate")
    return code, err.splitlines()


def test_spec_accepts_registry_sources_with_a_key_only(run: Run, tmp_path: Path) -> None:
    (tmp_path / "owner.pgp").write_text("x")
    head = '[system]\nid = "demo"\n'
    key = '[signing]\nopenpgp_key = "owner.pgp"\n'
    for good in ("oci://registry.example.org/fleet/os", "oci+http://127.0.0.1:5000/os"):
        code, lines = spec_problems(run, tmp_path, head + key + f'[update]\nsource = "{good}"\n')
        assert code == 0, lines
    code, lines = spec_problems(run, tmp_path,
                                head + '[update]\nsource = "oci://reg.example.org/Fleet:v1"\n')
    assert code == 2 and lines == [
        "particle.toml: update.source: oci://reg.example.org/Fleet:v1: give the repository "
        "without a tag or digest (machines pick the newest version among its tags)",
        "particle.toml: signing.openpgp_key: missing: required with an oci:// update source "
        "(the machine accepts a version from a registry only with SHA256SUMS signed by this "
        "key)",
        "hint: `particle genkey` writes one; add its openpgp_key line to [signing]",
    ]
    code, lines = spec_problems(run, tmp_path, head + '[update]\nsource = "ftp://x/y"\n')
    assert code == 2 and "allowed: an http:// or https:// URL, a registry oci://" in lines[0]


def test_builder_writes_local_transfers_and_the_source_for_a_registry(tmp_path: Path) -> None:
    (tmp_path / "owner.pgp").write_text("x")
    spec_file = tmp_path / "particle.toml"
    spec_file.write_text('[system]\nid = "demo"\n[signing]\nopenpgp_key = "owner.pgp"\n'
                         '[update]\nsource = "oci://registry.example.org/fleet/os"\n')
    spec = load_spec(spec_file)
    assert extra_packages(spec)[:2] == ["gpgv", "ca-certificates"]
    ctx = BuildContext(spec=spec, version="2", output_dir=tmp_path / "out",
                       work_dir=tmp_path / "work", tools=ToolsTree())
    ctx.tree = tmp_path / "root"
    (ctx.tree / "usr/lib/systemd/system").mkdir(parents=True)
    update_definitions(ctx)
    assert not list(ctx.tree.glob("usr/lib/sysupdate.d/*"))  # sysupdate cannot fetch these
    local = sorted(p.name for p in (ctx.tree / "usr/lib/particle/sysupdate.local.d").iterdir())
    assert local == ["10-usr-verity.transfer", "20-usr.transfer", "30-uki.transfer"]
    assert (ctx.tree / "usr/lib/particle/update-source").read_text() == \
        "oci://registry.example.org/fleet/os\n"
    dropin = ctx.tree / "usr/lib/systemd/system/systemd-sysupdate.service.d/50-particle-oci.conf"
    assert "ConditionDirectoryNotEmpty=/usr/lib/sysupdate.d\n" in dropin.read_text()
    plain = load_spec(spec_file, overrides=["update.source=oci+http://10.0.2.100/os"])
    assert "ca-certificates" not in extra_packages(plain) and "gpg" not in extra_packages(plain)
