"""Our dm-verity hash trees must be byte-identical to veritysetup's, or the image won't boot."""

from __future__ import annotations

import base64
import hashlib
import json
import random
import re
import shutil
from pathlib import Path
from uuid import UUID

import pytest

from particleos.runner import output, run
from particleos.verity import (
    DEFAULT_SALT,
    SUPERBLOCK_SIZE,
    VerityResult,
    format_verity,
    verity_sig_json,
    verity_uuids,
)

needs_veritysetup = pytest.mark.skipif(
    shutil.which("veritysetup") is None, reason="veritysetup (cryptsetup-bin) not installed"
)

SALT = bytes(range(1, 33))
UUID_FIXED = UUID("0f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f0")


def write_random(path: Path, size: int, seed: int) -> Path:
    path.write_bytes(random.Random(seed).randbytes(size))
    return path


def veritysetup_format(
    data: Path,
    hash_out: Path,
    salt: bytes,
    *,
    block_size: int = 4096,
    superblock: bool = True,
    uuid: UUID | None = None,
) -> tuple[str, int]:
    """Run the real tool with the same parameters; returns (root hash hex, data blocks)."""
    argv: list[str | Path] = [
        "veritysetup", "format", "--hash", "sha256",
        "--data-block-size", str(block_size), "--hash-block-size", str(block_size),
        "--salt", salt.hex() if salt else "-",
    ]  # fmt: skip
    if superblock:
        assert uuid is not None
        argv += ["--uuid", str(uuid)]
    else:
        argv.append("--no-superblock")
    text = output([*argv, data, hash_out])
    root = re.search(r"^Root hash:\s*([0-9a-f]+)$", text, re.MULTILINE)
    blocks = re.search(r"^Data blocks:\s*(\d+)$", text, re.MULTILINE)
    assert root and blocks, text
    return root.group(1), int(blocks.group(1))


def veritysetup_verify(data: Path, hash_file: Path, result: VerityResult, superblock: bool) -> bool:
    argv: list[str | Path] = ["veritysetup", "verify"]
    if not superblock:
        argv += [
            "--no-superblock", "--hash", "sha256", "--salt", result.salt.hex() or "-",
            "--data-block-size", str(result.data_block_size),
            "--hash-block-size", str(result.hash_block_size),
        ]  # fmt: skip
    proc = run([*argv, data, hash_file, result.root_hash_hex], check=False)
    return proc.returncode == 0


# (blocks, block size): one block (no tree at all), one hash level, two levels, three levels
# (128*128+1 blocks of 4 KiB), and a small block size whose trees are deeper.
SIZES = [(1, 4096), (2, 4096), (129, 4096), (128 * 128 + 1, 4096), (300, 512)]


@needs_veritysetup
@pytest.mark.parametrize("superblock", [True, False], ids=["superblock", "no-superblock"])
@pytest.mark.parametrize(("blocks", "block_size"), SIZES, ids=[f"{b}x{s}" for b, s in SIZES])
def test_matches_veritysetup_byte_for_byte(
    tmp_path: Path, blocks: int, block_size: int, superblock: bool
) -> None:
    data = write_random(tmp_path / "data", blocks * block_size, seed=blocks)
    ours, theirs = tmp_path / "ours.hash", tmp_path / "theirs.hash"

    result = format_verity(
        data, ours, SALT, block_size, superblock=superblock, uuid=UUID_FIXED if superblock else None
    )
    root_hex, data_blocks = veritysetup_format(
        data, theirs, SALT, block_size=block_size, superblock=superblock, uuid=UUID_FIXED
    )

    assert result.root_hash_hex == root_hex
    assert result.data_blocks == data_blocks == blocks
    assert result.data_size == blocks * block_size
    assert ours.read_bytes() == theirs.read_bytes()
    assert result.hash_size == ours.stat().st_size
    assert result.superblock_uuid == (UUID_FIXED if superblock else None)


@needs_veritysetup
@pytest.mark.parametrize("superblock", [True, False], ids=["superblock", "no-superblock"])
def test_veritysetup_verifies_ours_and_catches_one_flipped_byte(
    tmp_path: Path, superblock: bool
) -> None:
    data = write_random(tmp_path / "data", 129 * 4096, seed=7)
    hash_file = tmp_path / "hash"
    result = format_verity(data, hash_file, superblock=superblock)
    assert veritysetup_verify(data, hash_file, result, superblock)

    pristine = data.read_bytes()
    image = bytearray(pristine)
    image[100 * 4096 + 17] ^= 0x01
    data.write_bytes(image)
    assert not veritysetup_verify(data, hash_file, result, superblock)

    # And the tree itself is checked: corrupt level 0 (the last two hash blocks).
    data.write_bytes(pristine)
    tree = bytearray(hash_file.read_bytes())
    tree[-2 * 4096 + 5] ^= 0x01
    hash_file.write_bytes(tree)
    assert not veritysetup_verify(data, hash_file, result, superblock)


@needs_veritysetup
def test_default_salt_and_uuid_are_reproducible(tmp_path: Path) -> None:
    data = write_random(tmp_path / "data", 129 * 4096, seed=3)
    first = format_verity(data, tmp_path / "a")
    second = format_verity(data, tmp_path / "b")
    assert first == second
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()
    assert first.salt == DEFAULT_SALT and len(DEFAULT_SALT) == 32

    # The derived superblock UUID is an ordinary v4 UUID, distinct from both partition UUIDs,
    # and veritysetup writes the very same superblock when given it.
    sb_uuid = first.superblock_uuid
    assert sb_uuid is not None and sb_uuid.version == 4
    assert sb_uuid not in verity_uuids(first.root_hash)
    root_hex, _ = veritysetup_format(data, tmp_path / "theirs", DEFAULT_SALT, uuid=sb_uuid)
    assert root_hex == first.root_hash_hex
    assert (tmp_path / "theirs").read_bytes() == (tmp_path / "a").read_bytes()


@needs_veritysetup
def test_empty_salt_matches_veritysetup(tmp_path: Path) -> None:
    data = write_random(tmp_path / "data", 3 * 4096, seed=5)
    result = format_verity(data, tmp_path / "ours", b"", uuid=UUID_FIXED)
    root_hex, _ = veritysetup_format(data, tmp_path / "theirs", b"", uuid=UUID_FIXED)
    assert result.root_hash_hex == root_hex
    assert (tmp_path / "ours").read_bytes() == (tmp_path / "theirs").read_bytes()


@needs_veritysetup
def test_partial_last_block_is_refused_where_veritysetup_drops_it(tmp_path: Path) -> None:
    data = write_random(tmp_path / "data", 3 * 4096 + 1000, seed=9)
    # veritysetup accepts this but covers only the 3 whole blocks: the tail is unprotected.
    _, data_blocks = veritysetup_format(data, tmp_path / "theirs", SALT, uuid=UUID_FIXED)
    assert data_blocks == 3
    with pytest.raises(ValueError, match="not a positive multiple"):
        format_verity(data, tmp_path / "ours", SALT)


def test_superblock_layout(tmp_path: Path) -> None:
    data = write_random(tmp_path / "data", 5 * 4096, seed=1)
    result = format_verity(data, tmp_path / "hash", SALT, uuid=UUID_FIXED)
    raw = (tmp_path / "hash").read_bytes()
    assert len(raw) == result.hash_size == 2 * 4096  # superblock block + one hash block
    assert raw[:8] == b"verity\0\0"
    assert raw[0x10:0x20] == UUID_FIXED.bytes
    assert raw[0x20:0x27] == b"sha256\0"
    assert int.from_bytes(raw[0x48:0x50], "little") == 5
    assert raw[0x58 : 0x58 + 32] == SALT
    assert raw[SUPERBLOCK_SIZE:4096] == bytes(4096 - SUPERBLOCK_SIZE)


def test_bad_parameters_are_refused(tmp_path: Path) -> None:
    data = write_random(tmp_path / "data", 4096, seed=2)
    with pytest.raises(ValueError, match="salt"):
        format_verity(data, tmp_path / "hash", bytes(257))
    with pytest.raises(ValueError, match="block size"):
        format_verity(data, tmp_path / "hash", block_size=3000)
    (tmp_path / "empty").touch()
    with pytest.raises(ValueError, match="not a positive multiple"):
        format_verity(tmp_path / "empty", tmp_path / "hash")


def test_verity_uuids_are_the_root_hash_halves_unmodified() -> None:
    root = bytes(range(32))
    data_uuid, hash_uuid = verity_uuids(root)
    # systemd memcpy()s the halves into sd_id128_t and prints them as-is: no version bits set.
    assert str(data_uuid) == "00010203-0405-0607-0809-0a0b0c0d0e0f"
    assert str(hash_uuid) == "10111213-1415-1617-1819-1a1b1c1d1e1f"
    assert verity_uuids(b"\xff" * 32) == (UUID(int=2**128 - 1), UUID(int=2**128 - 1))
    with pytest.raises(ValueError):
        verity_uuids(b"\x00" * 15)


def test_verity_sig_json_layout() -> None:
    root_hex = "AB" * 32
    signature = b"\x30\x82\x01\x00" + bytes(range(256))
    cert = b"\x30\x82\x02\x00" + b"certificate"
    payload = verity_sig_json(root_hex, signature, cert)

    assert len(payload) % 4096 == 0
    text, _, padding = payload.partition(b"\0")
    assert padding == bytes(len(padding))
    assert text == (
        b'{"rootHash":"' + b"ab" * 32 + b'","certificateFingerprint":"'
        + hashlib.sha256(cert).hexdigest().encode() + b'","signature":"'
        + base64.b64encode(signature) + b'"}'
    )  # fmt: skip
    assert json.loads(text)["signature"] == base64.b64encode(signature).decode()


def test_verity_sig_json_always_nul_terminated_and_rejects_pem() -> None:
    # A JSON text of exactly 4096 bytes must still get a NUL, growing to 8192. Base64 lengths
    # step by 4, so with a 32-byte root hash that length is unreachable; a 33-byte one hits it.
    root_hex, cert = "00" * 33, b"\x30cert"
    for n in range(2900, 3000):
        sig = b"\x30" + bytes(n - 1)
        if len(verity_sig_json(root_hex, sig, cert).rstrip(b"\0")) == 4096:
            break
    else:
        pytest.fail("no signature length gives a 4096-byte JSON text")
    payload = verity_sig_json(root_hex, sig, cert)
    assert len(payload) == 8192 and payload[4096:] == bytes(4096)

    with pytest.raises(ValueError, match="DER"):
        verity_sig_json("00" * 32, b"-----BEGIN PKCS7-----", cert)
    with pytest.raises(ValueError):
        verity_sig_json("not hex", sig, cert)
