"""Signatures the kernel and the firmware check, made on the host: PKCS#7 over the root hash
(verified here with OpenSSL), the verity-sig JSON, the kernel command line that requires
signed /usr, Authenticode certificates read back from PE files, the trust stage on a small fake
tree, transfer files with Verify=yes, and the Secure Boot QEMU command line."""

from __future__ import annotations

import base64
import json
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from particleos import firmware, openpgp, secureboot, signing, vm
from particleos.builder import loader, trust
from particleos.builder.context import BuildContext
from particleos.builder.updates import update_definitions
from particleos.errors import ParticleError
from particleos.keys import KeyFiles, KeyPair, genkey, load_key_pair
from particleos.spec import load_spec
from particleos.tools import ToolsTree

ROOT_HASH = "3c" * 16 + "a9" * 16
needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl")
needs_gpg = pytest.mark.skipif(shutil.which("gpg") is None, reason="gnupg not installed")


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> KeyFiles:
    return genkey(tmp_path_factory.mktemp("k") / "keys", "Test Owner")


@pytest.fixture(scope="module")
def pair(keys: KeyFiles) -> KeyPair:
    return load_key_pair(keys.key, keys.certificate)


def openssl_verify(tmp_path: Path, sig: bytes, content: bytes, cert: Path,
                   *, tool: str = "smime") -> subprocess.CompletedProcess[str]:
    (tmp_path / "sig.der").write_bytes(sig)
    (tmp_path / "content").write_bytes(content)
    return subprocess.run(
        ["openssl", tool, "-verify", "-binary", "-inform", "DER", "-in", tmp_path / "sig.der",
         "-content", tmp_path / "content", "-CAfile", cert, "-certfile", cert,
         "-purpose", "any", "-out", "/dev/null"],
        capture_output=True, text=True, check=False,
    )


@needs_openssl
@pytest.mark.parametrize("embed", [True, False])
@pytest.mark.parametrize("tool", ["smime", "cms"])
def test_root_hash_signature_verifies_with_openssl(
    tmp_path: Path, keys: KeyFiles, pair: KeyPair, embed: bool, tool: str
) -> None:
    sig = signing.sign_root_hash(pair, ROOT_HASH.upper(), embed_certificate=embed)
    # Signed is the lower-case hex text, exactly what the kernel gets as the root hash.
    ok = openssl_verify(tmp_path, sig, ROOT_HASH.encode(), keys.certificate, tool=tool)
    assert ok.returncode == 0, ok.stderr
    bad = openssl_verify(tmp_path, sig, ROOT_HASH.replace("3c", "3d", 1).encode(),
                         keys.certificate, tool=tool)
    assert bad.returncode != 0


@needs_openssl
def test_signature_form_is_what_the_kernel_takes(tmp_path: Path, pair: KeyPair) -> None:
    """Detached, no signed attributes, SHA-256; the certificate only where asked for."""
    for embed in (True, False):
        (tmp_path / "s.der").write_bytes(
            signing.sign_root_hash(pair, ROOT_HASH, embed_certificate=embed))
        text = subprocess.run(
            ["openssl", "cms", "-cmsout", "-print", "-inform", "DER", "-in", tmp_path / "s.der"],
            capture_output=True, text=True, check=True).stdout
        assert "eContent: <ABSENT>" in text
        assert "signedAttrs:\n          <ABSENT>" in text
        assert "sha256" in text and "rsaEncryption" in text
        assert ("certificates:\n      <ABSENT>" in text) is not embed


@needs_openssl
def test_verity_signature_partition(tmp_path: Path, keys: KeyFiles, pair: KeyPair) -> None:
    raw = signing.verity_signature_partition(pair, ROOT_HASH)
    assert len(raw) == 4096 and raw.endswith(b"\0")
    doc = json.loads(raw.rstrip(b"\0"))
    assert list(doc) == ["rootHash", "certificateFingerprint", "signature"]
    assert doc["rootHash"] == ROOT_HASH
    assert doc["certificateFingerprint"] == pair.fingerprint
    sig = base64.b64decode(doc["signature"])
    assert openssl_verify(tmp_path, sig, ROOT_HASH.encode(), keys.certificate).returncode == 0


@needs_openssl
def test_kernel_cmdline_requires_signed_usr_and_fits(tmp_path: Path, keys: KeyFiles,
                                                     pair: KeyPair) -> None:
    args = signing.usr_signature_cmdline(pair, ROOT_HASH)
    assert args[0] == "dm_verity.require_signatures=1"
    prefix = "systemd.verity_usr_options=root-hash-signature=base64:"
    assert args[1].startswith(prefix) and "," not in args[1] and " " not in args[1]
    sig = base64.b64decode(args[1].removeprefix(prefix))
    assert openssl_verify(tmp_path, sig, ROOT_HASH.encode(), keys.certificate).returncode == 0
    assert len(" ".join(args)) < 800  # leaves most of the kernel's 2047 bytes to the user


def fake_pe(cert_blob: bytes | None) -> bytes:
    """A minimal PE32+ header whose security directory points at one WIN_CERTIFICATE."""
    pe = bytearray(0x200)
    pe[0:2] = b"MZ"
    struct.pack_into("<I", pe, 0x3C, 0x40)
    pe[0x40:0x44] = b"PE\0\0"
    struct.pack_into("<H", pe, 0x40 + 24, 0x20B)
    if cert_blob is not None:
        entry = bytearray(struct.pack("<IHH", 8 + len(cert_blob), 0x200, 2) + cert_blob)
        entry += bytes(-len(entry) % 8)
        struct.pack_into("<II", pe, 0x40 + 24 + 112 + 8 * 4, len(pe), len(entry))
        pe += entry
    return bytes(pe)


def test_pe_signer_certificates(pair: KeyPair) -> None:
    signed = fake_pe(signing.sign_root_hash(pair, ROOT_HASH))
    assert [c.subject for c in secureboot.pe_signer_certificates(signed)] == \
        [pair.certificate.subject]
    assert secureboot.pe_signer_certificates(fake_pe(None)) == []
    with pytest.raises(ParticleError, match="not a PE"):
        secureboot.pe_signer_certificates(b"\x7fELF" + bytes(100))


def make_ctx(tmp_path: Path, extra: str) -> BuildContext:
    spec = tmp_path / "spec/particle.toml"
    spec.parent.mkdir(parents=True)
    spec.write_text('[system]\nid = "demo"\n' + extra)
    tree = tmp_path / "root"
    for d in ("usr/lib/systemd/boot/efi", "usr/lib/systemd/system", "etc/systemd", "usr/bin"):
        (tree / d).mkdir(parents=True)
    (tree / loader.SDBOOT).write_bytes(b"MZ unsigned boot loader")
    (tree / trust.IMPORT_PUBRING).write_bytes(b"vendor keys")
    (tree / trust.ETC_IMPORT_PUBRING).write_bytes(b"local keys")
    (tree / "usr/bin/gpg").write_bytes(b"")
    ctx = BuildContext(spec=load_spec(spec), version="2", output_dir=tmp_path / "out",
                       work_dir=tmp_path / "work", tools=ToolsTree())
    ctx.work_dir.mkdir()
    ctx.tree = tree
    return ctx


def signing_toml(keys: KeyFiles) -> str:
    return (f'[signing]\nkey = "{keys.key}"\ncertificate = "{keys.certificate}"\n'
            f'openpgp_key = "{keys.openpgp_key}"\n')


@pytest.fixture
def fake_sbsign(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    signed: list[Path] = []

    def sbsign(tools: ToolsTree, key: Path, cert: Path, src: Path, dst: Path) -> Path:
        dst.write_bytes(src.read_bytes() + b" [signed]")
        signed.append(src)
        return dst

    monkeypatch.setattr(trust, "sbsign", sbsign)
    return signed


@needs_gpg
def test_trust_stages_put_only_public_material_into_the_image(
    tmp_path: Path, keys: KeyFiles, fake_sbsign: list[Path]
) -> None:
    ctx = make_ctx(tmp_path, signing_toml(keys))
    tree = ctx.tree
    assert tree is not None
    trust.install_trust(ctx)
    assert (tree / "usr/lib/verity.d/demo.crt").read_bytes() == keys.certificate.read_bytes()
    assert (tree / trust.IMPORT_PUBRING).read_bytes() == keys.openpgp_public.read_bytes()
    assert not (tree / trust.ETC_IMPORT_PUBRING).exists()
    assert ctx.bootloader == tree / (loader.SDBOOT + ".signed")
    assert ctx.bootloader.read_bytes().endswith(b"[signed]")
    secrets = [keys.key.read_bytes(), keys.openpgp_key.read_bytes()]
    for path in tree.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not any(s in data for s in secrets), path
    ctx.root_hash = bytes.fromhex(ROOT_HASH)
    trust.sign_verity(ctx)
    assert ctx.verity_sig is not None
    assert json.loads(ctx.verity_sig.read_bytes().rstrip(b"\0"))["rootHash"] == ROOT_HASH
    assert ctx.usr_signature_cmdline is not None
    assert ctx.usr_signature_cmdline[0] == "dm_verity.require_signatures=1"
    ctx.uki = ctx.work_dir / "uki.efi"
    ctx.uki.write_bytes(b"MZ uki")
    trust.sign_uki(ctx)
    assert ctx.boot_uki is not None and ctx.boot_uki.name == "uki.signed.efi"
    assert ctx.boot_uki.read_bytes().endswith(b"[signed]")
    assert ctx.uki.read_bytes() == b"MZ uki"  # the unsigned UKI is left as it was


@needs_gpg
def test_update_keys_are_trusted_too(tmp_path: Path, keys: KeyFiles,
                                     fake_sbsign: list[Path]) -> None:
    """Key rotation: an image can trust the next OpenPGP key before updates switch to it."""
    nxt = genkey(tmp_path / "next", "Next Owner")
    ctx = make_ctx(tmp_path, signing_toml(keys).replace(
        "[signing]\n", f'[signing]\nupdate_keys = ["{nxt.openpgp_public}"]\n'))
    trust.install_trust(ctx)
    assert ctx.tree is not None
    ring = ctx.tree / trust.IMPORT_PUBRING
    assert openpgp.fingerprints(ring) == [
        *openpgp.fingerprints(keys.openpgp_public), *openpgp.fingerprints(nxt.openpgp_public)]
    index = tmp_path / "SHA256SUMS"
    index.write_text("x\n")
    openpgp.sign_detached(nxt.openpgp_key, index)
    assert openpgp.verify(ring, index, tmp_path / "SHA256SUMS.gpg")


def test_unsigned_build_is_unchanged(tmp_path: Path, fake_sbsign: list[Path]) -> None:
    ctx = make_ctx(tmp_path, "")
    trust.install_trust(ctx)
    ctx.root_hash = bytes.fromhex(ROOT_HASH)
    trust.sign_verity(ctx)
    ctx.uki = ctx.work_dir / "uki.efi"
    trust.sign_uki(ctx)
    assert ctx.tree is not None
    assert ctx.verity_sig is None and ctx.usr_signature_cmdline == []
    assert ctx.bootloader == ctx.tree / loader.SDBOOT  # the tree's own, unsigned
    assert ctx.boot_uki == ctx.uki and not fake_sbsign
    assert (ctx.tree / trust.IMPORT_PUBRING).read_bytes() == b"vendor keys"
    assert not (ctx.tree / "usr/lib/verity.d").exists()


@needs_gpg
@needs_gpg
def test_signed_transfer_files_verify_and_carry_the_signature_partition(
    tmp_path: Path, keys: KeyFiles
) -> None:
    ctx = make_ctx(tmp_path, signing_toml(keys) + '[update]\nsource = "http://10.0.2.100/u/"\n')
    update_definitions(ctx)
    assert ctx.tree is not None
    files = sorted((ctx.tree / "usr/lib/sysupdate.d").glob("*.transfer"))
    assert files[0].name == "10-usr-verity-sig.transfer"
    for f in files:
        assert "Verify=yes\n" in f.read_text(), f.name
    assert "MatchPartitionType=usr-x86-64-verity-sig" in files[0].read_text()
    # Unsigned: no verification, no signature partition (as before).
    plain = make_ctx(tmp_path / "plain", '[update]\nsource = "http://10.0.2.100/u/"\n')
    update_definitions(plain)
    assert plain.tree is not None
    texts = [f.read_text() for f in (plain.tree / "usr/lib/sysupdate.d").glob("*.transfer")]
    assert texts and all("Verify=no\n" in t and "verity-sig" not in t for t in texts)


def test_secure_boot_qemu_command_line(tmp_path: Path) -> None:
    code, _ = firmware.find_ovmf()
    argv = vm.qemu_argv(tmp_path / "d.raw", vm.VMOptions(secure_boot=True), tmp_path / "v.fd",
                        "tcg")
    assert argv[argv.index("-machine") + 1] == "q35,smm=on"
    assert f"if=pflash,format=raw,unit=0,readonly=on,file={firmware.secboot_code(code)}" in argv
    assert "driver=cfi.pflash01,property=secure,value=on" in argv
    plain = vm.qemu_argv(tmp_path / "d.raw", vm.VMOptions(), tmp_path / "v.fd", "tcg")
    assert plain[plain.index("-machine") + 1] == "q35"
    assert not any("secboot" in a or "cfi.pflash01" in a for a in plain)


@needs_gpg
def test_local_transfer_files_mirror_the_url_ones_with_the_incoming_directory(
    tmp_path: Path, keys: KeyFiles
) -> None:
    """particle installs files it fetched itself (deltas, registries) through these: the same
    targets and order as the URL transfers, the source a local directory, no gpg check (particle
    verifies the files against the signed SHA256SUMS before)."""
    ctx = make_ctx(tmp_path, signing_toml(keys) + '[update]\nsource = "http://10.0.2.100/u/"\n')
    update_definitions(ctx)
    assert ctx.tree is not None
    url = {f.name: f.read_text() for f in (ctx.tree / "usr/lib/sysupdate.d").glob("*.transfer")}
    local_dir = ctx.tree / "usr/lib/particle/sysupdate.local.d"
    local = {f.name: f.read_text() for f in local_dir.glob("*.transfer")}
    assert sorted(local) == sorted(url)
    for name, text in local.items():
        assert "Type=regular-file\nPath=/var/lib/particle/incoming\n" in text, name
        assert "Verify=no\n" in text
        assert text.split("[Target]")[1] == url[name].split("[Target]")[1]
