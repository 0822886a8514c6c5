"""`particle genkey` and the OpenPGP side: file modes, refusing to overwrite, key/certificate
checks, and SHA256SUMS signatures that gpgv accepts only from the right key and content."""

from __future__ import annotations

import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from particleos import openpgp
from particleos.cli import main
from particleos.errors import ParticleError
from particleos.keys import KeyFiles, genkey, load_key_pair, owner_guid
from particleos.spec import load_spec
from particleos.update.publish import INDEX, SIGNATURE, write_index

needs_gpg = pytest.mark.skipif(shutil.which("gpg") is None, reason="gnupg not installed")


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> KeyFiles:
    return genkey(tmp_path_factory.mktemp("k") / "keys", "Test Owner")


@pytest.fixture(scope="module")
def other_keys(tmp_path_factory: pytest.TempPathFactory) -> KeyFiles:
    return genkey(tmp_path_factory.mktemp("k") / "other", "Someone Else")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@needs_gpg
def test_genkey_writes_private_files_0600_in_a_0700_directory(keys: KeyFiles) -> None:
    assert mode(keys.key.parent) == 0o700
    for path in (keys.key, keys.certificate, keys.openpgp_key, keys.openpgp_public):
        assert mode(path) == 0o600, path
    assert sorted(p.name for p in keys.key.parent.iterdir()) == sorted(
        ["particle.key", "particle.crt", "particle-openpgp.asc", "particle-openpgp.pub.gpg"]
    )
    assert b"BEGIN PRIVATE KEY" in keys.key.read_bytes()
    assert b"BEGIN PGP PRIVATE KEY BLOCK" in keys.openpgp_key.read_bytes()


@needs_gpg
def test_certificate_belongs_to_the_key_and_is_a_self_signed_ca(keys: KeyFiles) -> None:
    pair = load_key_pair(keys.key, keys.certificate)
    cert = pair.certificate
    assert cert.subject == cert.issuer
    assert cert.subject.rfc4514_string() == "CN=Test Owner"
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cert.verify_directly_issued_by(cert)  # the self-signature is valid
    assert pair.key.key_size == 2048
    assert len(pair.fingerprint) == 64
    assert owner_guid(cert) == owner_guid(load_key_pair(keys.key, keys.certificate).certificate)


@needs_gpg
def test_genkey_refuses_to_overwrite_and_force_replaces(tmp_path: Path) -> None:
    first = genkey(tmp_path / "k", "A")
    old = first.key.read_bytes()
    with pytest.raises(ParticleError, match=r"already exists.*--force"):
        genkey(tmp_path / "k", "A")
    assert first.key.read_bytes() == old
    genkey(tmp_path / "k", "A", force=True)
    assert first.key.read_bytes() != old
    assert mode(first.key) == 0o600


def test_load_key_pair_explains_bad_inputs(tmp_path: Path, keys: KeyFiles,
                                           other_keys: KeyFiles) -> None:
    with pytest.raises(ParticleError, match=r"cannot read .*missing\.key"):
        load_key_pair(tmp_path / "missing.key", keys.certificate)
    with pytest.raises(ParticleError, match="does not belong to the key"):
        load_key_pair(keys.key, other_keys.certificate)
    ec_key = tmp_path / "ec.key"
    ec_key.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    with pytest.raises(ParticleError, match="not an RSA key"):
        load_key_pair(ec_key, keys.certificate)
    with pytest.raises(ParticleError, match="not a PEM certificate"):
        load_key_pair(keys.key, keys.key)


@needs_gpg
def test_genkey_command_prints_a_spec_section_that_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["particle", "genkey", "mykeys", "--name", "Demo"])
    main()
    out = capsys.readouterr().out
    assert "wrote mykeys/particle.key" in out
    section = out[out.index("[signing]"):]
    spec = tmp_path / "particle.toml"
    spec.write_text('[system]\nid = "demo"\n' + section)
    signing = load_spec(spec).signing
    assert signing.key == str(tmp_path / "mykeys/particle.key")
    assert signing.openpgp_key == str(tmp_path / "mykeys/particle-openpgp.asc")
    # Running it again keeps the keys and says why.
    monkeypatch.setattr(sys, "argv", ["particle", "genkey", "mykeys"])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 1
    assert "already exists" in capsys.readouterr().err


@needs_gpg
def test_public_keyring_holds_no_secret_material(keys: KeyFiles) -> None:
    ring = openpgp.public_keyring(keys.openpgp_key)
    assert ring == keys.openpgp_public.read_bytes()
    packets = subprocess.run(["gpg", "--list-packets"], input=ring, capture_output=True,
                             check=True).stdout.decode()
    assert ":public key packet:" in packets
    assert "secret" not in packets


@needs_gpg
def test_sha256sums_signature_checks_content_and_key(
    tmp_path: Path, keys: KeyFiles, other_keys: KeyFiles
) -> None:
    """What the machine's gpg does with SHA256SUMS.gpg, against the image's keyring."""
    update_dir = tmp_path / "updates"
    update_dir.mkdir()
    entries = {"demo_2.efi": "ab" * 32, "demo_2_x.usr.raw": "cd" * 32}
    # The publish hook: SHA256SUMS and its signature go into place together.
    write_index(update_dir, entries, openpgp.signer(keys.openpgp_key))
    index, sig = update_dir / INDEX, update_dir / SIGNATURE
    assert sig.is_file() and not list(update_dir.glob(".*"))
    ring = keys.openpgp_public
    assert openpgp.verify(ring, index, sig)
    # Another key's signature, a changed hash, no signature: all refused.
    assert not openpgp.verify(other_keys.openpgp_public, index, sig)
    index.write_text(index.read_text().replace("ab" * 32, "ef" * 32))
    assert not openpgp.verify(ring, index, sig)
    openpgp.sign_detached(other_keys.openpgp_key, index)
    assert not openpgp.verify(ring, index, sig)
    sig.unlink()
    assert not openpgp.verify(ring, index, sig)


def test_missing_openpgp_key_is_explained(tmp_path: Path) -> None:
    with pytest.raises(ParticleError, match=r"openpgp_key: .*does not exist"):
        openpgp.public_keyring(tmp_path / "nope.asc")
    bad = tmp_path / "bad.asc"
    bad.write_text("not a key\n")
    with pytest.raises(ParticleError, match="not an OpenPGP key"):
        openpgp.public_keyring(bad)
