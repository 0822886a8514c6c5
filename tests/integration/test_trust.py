"""The trust chain, attacked for real: a signed image boots under enforced Secure Boot with a
/usr the kernel only accepts with the owner's signature, and its systemd-sysupdate refuses
updates whose SHA256SUMS is unsigned, signed by another key, or lists a wrong hash, and never
downgrades; a UKI with one byte changed is refused by the firmware; a /usr with one byte flipped
is caught by dm-verity; and no private key byte is found in any output. One build, three boots
(the two altered ones stop early)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import threading
import uuid
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from particleos import openpgp
from particleos.builder import BuildResult
from particleos.disk import PartType, read_table
from particleos.formats import format_sha256sums
from particleos.keys import (
    KeyFiles,
    KeyPair,
    fingerprint,
    genkey,
    load_key_pair,
    self_signed_certificate,
)
from particleos.secureboot import enroll_vars, pe_signer_certificates
from particleos.signing import sign_root_hash
from particleos.tools import ToolsTree
from particleos.update.transfer import UKI, USR, VERITY, VERITY_SIG, served_name
from particleos.vm import VM, VMOptions, find_ovmf

from .conftest import BuildFn
from .relay import user_nic

pytestmark = pytest.mark.slow
VERSION = "1.0.0"
NAME = f"particle-minimal_{VERSION}"
SECTOR = 512


def checks(console: str) -> dict[str, str]:
    return dict(re.findall(r"PARTICLE-CHECK ([\w-]+)=(.*?)\r?\n", console))


@pytest.fixture(scope="module")
def owner(tmp_path_factory: pytest.TempPathFactory) -> KeyFiles:
    return genkey(tmp_path_factory.mktemp("keys") / "owner", "ParticleOS test owner")


@pytest.fixture(scope="module")
def signed(build_image: BuildFn, owner: KeyFiles) -> BuildResult:
    return build_image("trustcheck", VERSION, overrides=[
        f"signing.key={owner.key}", f"signing.certificate={owner.certificate}",
        f"signing.openpgp_key={owner.openpgp_key}",
    ])


@pytest.fixture(scope="module")
def pair(owner: KeyFiles) -> KeyPair:
    return load_key_pair(owner.key, owner.certificate)


@pytest.fixture(scope="module")
def enrolled_vars(pair: KeyPair, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """OVMF variables in user mode with the owner's certificate as PK, KEK and db."""
    out = tmp_path_factory.mktemp("firmware") / "secureboot-vars.fd"
    return enroll_vars(ToolsTree(), find_ovmf()[1], pair.certificate, out, enforce=True)


@pytest.fixture
def vars_copy(enrolled_vars: Path, tmp_path: Path) -> Path:
    """Each boot gets its own copy: the firmware writes to its variable store."""
    dest = tmp_path / "vars.fd"
    shutil.copyfile(enrolled_vars, dest)
    return dest


def sb_vm(disk: Path, vars_file: Path, log: Path, extra: list[str] | None = None) -> VM:
    return VM(disk, VMOptions(snapshot=True, secure_boot=True, vars_file=vars_file, log=log,
                              nic=["none"], extra=extra or []))


def partitions(disk: Path, type_uuid: object) -> list[dict[str, object]]:
    return [p for p in read_table(disk) if str(p["type"]).lower() == str(type_uuid)]


def sparse_copy(src: Path, dest: Path) -> Path:
    subprocess.run(["cp", "--sparse=always", src, dest], check=True)
    return dest


def test_signed_artifacts_and_layout(signed: BuildResult, pair: KeyPair,
                                     tmp_path: Path) -> None:
    out = signed.output_dir
    sig_file = out / f"{NAME}.usr-verity-sig.raw"
    raw = sig_file.read_bytes()
    assert len(raw) % 4096 == 0
    doc = json.loads(raw.rstrip(b"\0"))
    assert doc["rootHash"] == signed.root_hash
    assert doc["certificateFingerprint"] == pair.fingerprint
    # The signature is a detached PKCS#7 over the hex root hash that OpenSSL verifies.
    (tmp_path / "sig.der").write_bytes(base64.b64decode(doc["signature"]))
    (tmp_path / "roothash").write_text(signed.root_hash)
    (tmp_path / "cert.pem").write_bytes(pair.cert_pem)
    proc = subprocess.run(
        ["openssl", "smime", "-verify", "-binary", "-inform", "DER", "-in", tmp_path / "sig.der",
         "-content", tmp_path / "roothash", "-CAfile", tmp_path / "cert.pem", "-purpose", "any",
         "-out", "/dev/null"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    # Slot A has the signature partition (with exactly that content), slot B an empty one.
    sigs = partitions(signed.disk, PartType.USR_VERITY_SIG)
    assert [p["name"] for p in sigs] == [NAME, "_empty"]
    with signed.disk.open("rb") as f:
        f.seek(int(str(sigs[0]["start"])) * SECTOR)
        assert f.read(len(raw)) == raw
    # The UKI and the boot loader carry Authenticode signatures by the owner's certificate.
    uki = (out / f"{NAME}.efi").read_bytes()
    assert [fingerprint(c) for c in pe_signer_certificates(uki)] == [pair.fingerprint]
    assert b"dm_verity.require_signatures=1" in uki
    assert b"systemd.verity_usr_options=root-hash-signature=base64:" in uki
    ToolsTree().run(["sbverify", "--cert", tmp_path / "cert.pem", out / f"{NAME}.efi"],
                    binds={tmp_path, out}, what="sbverify")
    # The artifact is listed in SHA256SUMS, as the other update artifacts are.
    assert f"{NAME}.usr-verity-sig.raw" in (out / "SHA256SUMS").read_text()


def _secret_needles(owner: KeyFiles) -> dict[str, bytes]:
    """Byte strings that only a copy of a private key would contain."""
    key = serialization.load_pem_private_key(owner.key.read_bytes(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    nums = key.private_numbers()
    needles = {
        "rsa p": nums.p.to_bytes(128, "big"),
        "rsa q": nums.q.to_bytes(128, "big"),
        "rsa d": nums.d.to_bytes(256, "big")[64:128],
    }
    pem_lines = [ln for ln in owner.key.read_bytes().splitlines() if b"-----" not in ln]
    needles.update({f"key PEM line {i}": pem_lines[i] for i in (3, 10, 20)})
    body = _armor_body(owner.openpgp_key)
    needles.update({f"OpenPGP armor line {i}": body[i] for i in (1, 3, 5) if i < len(body)})
    secret = base64.b64decode(b"".join(body))
    public = owner.openpgp_public.read_bytes()
    chunks = [secret[i : i + 24] for i in range(0, len(secret) - 24, 8)]
    private_chunks = [c for c in chunks if c not in public]
    assert private_chunks, "the secret key export has no bytes beyond the public key?"
    needles.update({f"OpenPGP secret bytes {i}": c for i, c in enumerate(private_chunks[:6])})
    return needles


def _armor_body(path: Path) -> list[bytes]:
    """The base64 lines of an ASCII-armored OpenPGP block (no headers, no checksum)."""
    return [ln for ln in path.read_bytes().splitlines()
            if ln and b":" not in ln and b"-----" not in ln and not ln.startswith(b"=")]


def _data_chunks(path: Path, size: int = 64 << 20, overlap: int = 512) -> Iterator[bytes]:
    """The file's bytes, skipping holes (the disk image is mostly holes), in overlapping
    chunks so that a needle across a chunk boundary is still found."""
    with path.open("rb") as f:
        fd, end, pos = f.fileno(), path.stat().st_size, 0
        while pos < end:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                return
            stop = os.lseek(fd, start, os.SEEK_HOLE)
            f.seek(start)
            while start < stop:
                f.seek(max(start - overlap, 0))
                yield f.read(min(size, stop - start) + overlap)
                start += size
            pos = stop


def test_private_keys_never_in_outputs(signed: BuildResult, owner: KeyFiles,
                                       tmp_path: Path) -> None:
    needles = _secret_needles(owner)
    # Positive control: the scanner finds every needle in a sparse file holding the keys.
    control = tmp_path / "control.raw"
    with control.open("wb") as f:
        f.seek(200 << 20)  # a hole first, as in the disk image
        f.write(owner.key.read_bytes() + owner.openpgp_key.read_bytes())
        f.write(base64.b64decode(b"".join(_armor_body(owner.openpgp_key))))
        key = serialization.load_pem_private_key(owner.key.read_bytes(), password=None)
        f.write(key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    assert {w for w, n in needles.items() if any(n in c for c in _data_chunks(control))} \
        == set(needles)
    # Everything the build wrote, plus /usr unpacked (the erofs image is compressed).
    usr_tree = tmp_path / "usr"
    ToolsTree().run(["fsck.erofs", f"--extract={usr_tree}", signed.output_dir / f"{NAME}.usr.raw"],
                    binds={tmp_path, signed.output_dir}, what="fsck.erofs --extract")
    files = [p for p in signed.output_dir.iterdir() if p.is_file()]
    files += [p for p in usr_tree.rglob("*") if p.is_file() and not p.is_symlink()]
    assert len(files) > 1000
    found = []
    for path in files:
        for chunk in _data_chunks(path):
            found += [f"{what} in {path}" for what, n in needles.items() if n in chunk]
    assert not found
    # Only the public parts went in: the certificate and the OpenPGP public keyring.
    assert (usr_tree / "lib/verity.d/particle-minimal.crt").read_bytes() == \
        owner.certificate.read_bytes()
    assert (usr_tree / "lib/systemd/import-pubring.gpg").read_bytes() == \
        owner.openpgp_public.read_bytes()


def fake_version(image_id: str, version: str) -> dict[str, bytes]:
    """Served file name -> content of one version. Only the first transfer's file (the
    signature partition) is ever downloaded in these cases, the rest are never reached."""
    files = {}
    for part in (VERITY_SIG, VERITY, USR):
        pid = uuid.uuid5(uuid.NAMESPACE_URL, f"{version}/{part.key}")
        files[served_name(image_id, version, part, pid)] = part.key.encode() * 512
    files[served_name(image_id, version, UKI)] = b"MZ not really a UKI"
    return files


@pytest.fixture(scope="module")
def update_server(owner: KeyFiles, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """An HTTP server on the host's loopback with one directory per case; yields its port."""
    root = tmp_path_factory.mktemp("updates")
    mallory = genkey(tmp_path_factory.mktemp("keys") / "mallory", "Mallory")
    cases = {  # directory: (version offered, signing key, listed digest of the sig file)
        "good": ("2.0.0", owner.openpgp_key, None),
        "unsigned": ("2.0.0", None, None),
        "foreign": ("2.0.0", mallory.openpgp_key, None),
        "badhash": ("2.0.0", owner.openpgp_key, "00" * 32),
        "downgrade": ("0.9", owner.openpgp_key, None),
    }
    for case, (version, key, digest) in cases.items():
        d = root / case
        d.mkdir()
        files = fake_version("particle-minimal", version)
        index = {}
        for name, data in files.items():
            (d / name).write_bytes(data)
            index[name] = hashlib.sha256(data).hexdigest()
            if digest and name.endswith(VERITY_SIG.suffix):
                index[name] = digest
        (d / "SHA256SUMS").write_text(format_sha256sums(index))
        if key is not None:
            openpgp.sign_detached(key, d / "SHA256SUMS")
    handler = partial(SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None  # type: ignore[attr-defined]
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def sysupdate_log(console: str) -> dict[str, str]:
    """What systemd-sysupdate said in each case (the check script tags its output)."""
    log: dict[str, str] = {}
    for case, line in re.findall(r"PARTICLE-LOG ([\w-]+): (.*?)\r?\n", console):
        log[case] = log.get(case, "") + line + "\n"
    return log


def test_boots_with_secure_boot_and_signed_usr_only(
    signed: BuildResult, owner: KeyFiles, vars_copy: Path, update_server: int, tmp_path: Path
) -> None:
    # A root hash signature by a key the machine does not trust, handed in as a credential.
    foreign_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    foreign = KeyPair(foreign_key, self_signed_certificate(foreign_key, "Mallory", 30))
    sig = base64.b64encode(sign_root_hash(foreign, signed.root_hash)).decode()
    smbios = ["-smbios", f"type=11,value=io.systemd.credential.binary:particle.foreign-sig={sig}"]
    with VM(signed.disk, VMOptions(snapshot=True, secure_boot=True, vars_file=vars_copy,
                                   log=tmp_path / "console.log", extra=smbios,
                                   nic=[user_nic(update_server)])) as vm:
        vm.expect(r"PARTICLE-CHECK done", timeout=480)
        vm_text = vm.text()
        seen = checks(vm_text)
        vm.wait(timeout=120)
    assert seen["system-state"] in ("running", "degraded"), seen
    assert seen["image-version"] == VERSION
    # Secure Boot is on and enforced (user mode), and the kernel knows it.
    assert seen["secure-boot"] == "1"
    assert seen["setup-mode"] == "0"
    assert seen["bootctl-secure-boot"].startswith("enabled")
    assert seen["lockdown"] == "integrity"
    # The kernel refuses verity devices without a trusted signature; /usr is one that passed.
    assert seen["require-signatures"] == "Y"
    assert "ParticleOS test owner" in seen["platform-certs"]
    assert seen["usr-source"] == "/dev/mapper/usr"
    assert seen["usr-dm-uuid"].startswith("CRYPT-VERITY-")
    assert seen["usr-table-signed"] == "yes"
    assert seen["usr-write"] == "refused"
    # The same /usr offered again: refused unsigned and with a foreign signature, accepted
    # with the signature from its usr-verity-sig partition.
    assert seen["attach-unsigned"].startswith("refused"), seen["attach-unsigned"]
    assert seen["attach-foreign"].startswith("refused"), seen["attach-foreign"]
    assert seen["sig-json-roothash"] == "match"
    assert seen["attach-partition-sig"] == "accepted", seen["attach-partition-sig"]
    # Public material only: the certificate for userspace checks, no private keys.
    assert seen["verity-cert"] == "particle-minimal.crt"
    assert seen["private-keys"] == "0"
    # Updates: verified against the owner's OpenPGP key only.
    assert seen["verify-setting"] == "yes"
    assert seen["pubring-fingerprints"] == "|".join(openpgp.fingerprints(owner.openpgp_public))
    log = sysupdate_log(vm_text)
    assert seen["update-good"].startswith("rc=0") and "2.0.0" in seen["update-good"], seen
    assert "Signature verification succeeded." in log["good"]
    reasons = {
        "unsigned": "Failed to retrieve signature file, cannot verify.",
        "foreign": "DOWNLOAD INVALID: Signature verification failed.",
        "badhash": "file did not check out, file has been tampered with.",
    }
    for case, reason in reasons.items():
        assert not seen[f"update-{case}"].startswith("rc=0"), (case, seen[f"update-{case}"])
        assert reason in log[case], (case, log[case])
    assert seen["update-downgrade"] == "rc=0 No update needed.", seen["update-downgrade"]
    # ... and nothing changed: slot B is still empty, no new UKI.
    assert seen["usr-labels-after"] == f"{NAME}|_empty"
    assert seen["ukis-after"] == f"{NAME}.efi"
    # sysupdate does install an older version that root names explicitly (recorded, not a
    # network attack: the index is still verified); systemd-boot keeps the newest as default.
    assert "update '0.9'" in seen["update-downgrade-explicit"]
    assert seen["default-entry"] == f"{NAME}.efi", seen["default-entry"]


def _pe_section(data: bytes, name: bytes) -> tuple[int, int]:
    """(file offset, size) of a PE section."""
    pe = struct.unpack_from("<I", data, 0x3C)[0]
    count = struct.unpack_from("<H", data, pe + 6)[0]
    table = pe + 24 + struct.unpack_from("<H", data, pe + 20)[0]
    for i in range(count):
        entry = table + 40 * i
        if data[entry : entry + 8].rstrip(b"\0") == name:
            size, offset = struct.unpack_from("<II", data, entry + 16)
            return offset, size
    raise AssertionError(f"no {name!r} section")


def test_uki_altered_by_one_byte_is_refused(signed: BuildResult, vars_copy: Path,
                                            tmp_path: Path) -> None:
    disk = sparse_copy(signed.disk, tmp_path / "disk.raw")
    esp = partitions(disk, PartType.ESP)[0]
    target = f"{disk}@@{int(str(esp['start'])) * SECTOR}"
    uki_path = f"::/EFI/Linux/{NAME}.efi"
    local = tmp_path / "uki.efi"
    subprocess.run(["mcopy", "-n", "-i", target, uki_path, local], check=True)
    data = bytearray(local.read_bytes())
    offset, size = _pe_section(bytes(data), b".linux")
    data[offset + size // 2] ^= 0x01  # one bit of the kernel, inside the signed hash
    local.write_bytes(bytes(data))
    subprocess.run(["mcopy", "-o", "-n", "-i", target, local, uki_path], check=True)
    with sb_vm(disk, vars_copy, tmp_path / "console.log") as vm:
        # systemd-boot asks the firmware to load the UKI; the firmware's signature check fails.
        vm.expect(rf"Error loading \\EFI\\Linux\\{re.escape(NAME)}\.efi: "
                  r"(?i:access denied|security violation)", timeout=120)
        text = vm.text()
    assert "Linux version" not in text and "PARTICLE-CHECK" not in text


def test_usr_with_one_flipped_byte_is_caught_by_verity(signed: BuildResult, vars_copy: Path,
                                                       tmp_path: Path) -> None:
    disk = sparse_copy(signed.disk, tmp_path / "disk.raw")
    usr = partitions(disk, PartType.USR)[0]
    with disk.open("r+b") as f:
        pos = int(str(usr["start"])) * SECTOR + 1024 + 64  # inside the erofs superblock
        f.seek(pos)
        byte = f.read(1)
        f.seek(pos)
        f.write(bytes([byte[0] ^ 0x01]))
    with sb_vm(disk, vars_copy, tmp_path / "console.log") as vm:
        vm.expect(r"device-mapper: verity: [^\n]*data block \d+ is corrupted", timeout=240)
        text = vm.text()
    assert "PARTICLE-CHECK" not in text


def test_enrolled_variables_hold_the_owner_certificate(tmp_path: Path, pair: KeyPair) -> None:
    """Secure Boot enforced: the owner is PK, KEK and db; setup mode (the db only, what a
    machine that enrolls its own keys starts from): nothing enforced."""
    tools = ToolsTree()
    _, template = find_ovmf()
    enforced = enroll_vars(tools, template, pair.certificate, tmp_path / "sb.fd", enforce=True)
    setup = enroll_vars(tools, template, pair.certificate, tmp_path / "db.fd", enforce=False)
    shown = {
        path: tools.run(["virt-fw-vars", "--input", path, "--print", "--verbose"],
                        binds={tmp_path}, capture=True)
        for path in (enforced, setup)
    }

    def holders(text: str) -> dict[str, str]:
        """Variable name -> the subject of the certificate in it (or its first value)."""
        return {m[0]: m[1].strip() for m in re.findall(
            r"name=(\w+) [^\n]*\n(?:  siglist[^\n]*\n)?\s+(?:subject )?([^\n]*)", text)}

    owner = pair.certificate.subject.rfc4514_string()
    sb = holders(shown[enforced])
    assert {sb[v] for v in ("PK", "KEK", "db")} == {owner}
    assert sb["SecureBootEnable"] == "bool: ON"
    db_only = holders(shown[setup])
    assert db_only["db"] == owner
    assert "PK" not in db_only and "KEK" not in db_only  # setup mode: nothing enforced
