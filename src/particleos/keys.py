"""The owner's keys: one X.509 key pair signs what the machine boots (the dm-verity root hash of
/usr, the UKI and systemd-boot for Secure Boot), one OpenPGP key signs update metadata
(SHA256SUMS), because systemd-sysupdate verifies downloads with gpg and nothing else.

Private keys stay on the machine that builds and publishes: a build reads them to sign and
copies only certificates and public keys into images (tests scan the outputs to prove it).
"""

from __future__ import annotations

import datetime
import hashlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from . import openpgp
from .errors import ParticleError

KEY_FILE: Final = "particle.key"
CERT_FILE: Final = "particle.crt"
OPENPGP_KEY_FILE: Final = "particle-openpgp.asc"
OPENPGP_PUBLIC_FILE: Final = "particle-openpgp.pub.gpg"
# RSA-2048: what every UEFI firmware verifies (some reject larger db keys), what the kernel's
# keyrings accept, and small enough that a signature fits on the kernel command line.
RSA_BITS: Final = 2048
DEFAULT_DAYS: Final = 3650


@dataclass(frozen=True)
class KeyFiles:
    """What `particle genkey` wrote; the first three go into `[signing]`."""

    key: Path
    certificate: Path
    openpgp_key: Path
    openpgp_public: Path

    def spec_snippet(self) -> str:
        return (
            "[signing]\n"
            f'key = "{self.key}"\n'
            f'certificate = "{self.certificate}"\n'
            f'openpgp_key = "{self.openpgp_key}"\n'
        )


@dataclass(frozen=True)
class KeyPair:
    """A private key with the certificate that names its public half."""

    key: rsa.RSAPrivateKey
    certificate: x509.Certificate

    @property
    def cert_der(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.DER)

    @property
    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.certificate)


def fingerprint(cert: x509.Certificate) -> str:
    """sha256 of the DER certificate: what verity-sig JSON and the kernel keyring name."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def owner_guid(cert: x509.Certificate) -> uuid.UUID:
    """Signature owner GUID for the firmware's PK/KEK/db entries; stable per certificate."""
    return uuid.uuid5(uuid.NAMESPACE_OID, f"particleos:{fingerprint(cert)}")


def genkey(
    directory: Path, common_name: str, *, days: int = DEFAULT_DAYS, force: bool = False
) -> KeyFiles:
    """Write a new key set into `directory` (mode 0700, files 0600); refuse to overwrite one
    unless `force`, because losing a key means no machine accepts the next update."""
    files = KeyFiles(
        key=directory / KEY_FILE,
        certificate=directory / CERT_FILE,
        openpgp_key=directory / OPENPGP_KEY_FILE,
        openpgp_public=directory / OPENPGP_PUBLIC_FILE,
    )
    existing = [p for p in (files.key, files.certificate, files.openpgp_key) if p.exists()]
    if existing and not force:
        raise ParticleError(
            f"{existing[0]} already exists: keep it (machines trust it), or pass --force to "
            "replace the whole key set (see 'Keys and signing' in the README on rotation)"
        )
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    cert = self_signed_certificate(key, common_name, days)
    _write_private(
        files.key,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    _write_private(files.certificate, cert.public_bytes(serialization.Encoding.PEM))
    secret, public = openpgp.generate(f"{common_name} (update signing)")
    _write_private(files.openpgp_key, secret)
    _write_private(files.openpgp_public, public)
    return files


def self_signed_certificate(
    key: rsa.RSAPrivateKey, common_name: str, days: int
) -> x509.Certificate:
    """A self-signed CA certificate, as `openssl req -x509` (and mkosi genkey) make: usable as
    PK, KEK and db entry, as a kernel keyring key and as an S/MIME trust anchor alike."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    public = key.public_key()
    ski = x509.SubjectKeyIdentifier.from_public_key(public)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=False,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )


def load_key_pair(key_path: Path, cert_path: Path) -> KeyPair:
    """Read `[signing] key` and `certificate`; errors say which file and what is wrong."""
    try:
        key_data = key_path.read_bytes()
        cert_data = cert_path.read_bytes()
    except OSError as err:
        raise ParticleError(
            f"signing: cannot read {err.filename}: {err.strerror} (create keys with "
            "`particle genkey`)"
        ) from None
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except (ValueError, TypeError) as err:
        raise ParticleError(
            f"signing.key: {key_path} is not an unencrypted PEM private key ({err})"
        ) from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ParticleError(f"signing.key: {key_path} is not an RSA key (firmware needs RSA)")
    try:
        cert = x509.load_pem_x509_certificate(cert_data)
    except ValueError as err:
        raise ParticleError(
            f"signing.certificate: {cert_path} is not a PEM certificate ({err})"
        ) from None
    cert_key = cert.public_key()
    if not (
        isinstance(cert_key, rsa.RSAPublicKey)
        and cert_key.public_numbers() == key.public_key().public_numbers()
    ):
        raise ParticleError(
            f"signing: the certificate {cert_path} does not belong to the key {key_path}"
        )
    return KeyPair(key, cert)


def _write_private(path: Path, data: bytes) -> None:
    """Create with mode 0600 from the start (no window in which the file is world-readable)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
