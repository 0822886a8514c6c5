"""The encrypted root (`[image] encrypt = "tpm2"`) without booting: the spec's checks through
the real CLI, what the build puts into the image and the disk it makes, and the machine side's
reading of a real LUKS2 header (made by cryptsetup, with a TPM2 token as systemd writes it).
tests/integration/test_encrypted.py boots it with swtpm."""

from __future__ import annotations

import json
import subprocess
import textwrap
import uuid
from pathlib import Path

import pytest

from particleos.builder import encryption, repart
from particleos.builder.bootstrap import extra_packages
from particleos.disk import MiB, Partition, PartType, read_table, write_disk
from particleos.machine import encryption as machine_enc
from particleos.spec.model import Spec

from .conftest import Run

GOOD = '[system]\nid = "demo"\n'


def problems(run: Run, tmp_path: Path, text: str) -> list[str]:
    (tmp_path / "particle.toml").write_text(textwrap.dedent(text))
    code, out, err = run("validate")
    assert (code, out) == (2, ""), err
    return err.splitlines()


def spec(**image: object) -> Spec:
    return Spec.model_validate({"system": {"id": "demo"}, "image": image})


# --- spec -------------------------------------------------------------------------------------


def test_encrypted_spec_validates(run: Run, tmp_path: Path) -> None:
    for text in (GOOD + '[image]\nencrypt = "tpm2"\n',
                 GOOD + '[image]\nencrypt = "tpm2"\nrecovery_key = "/efi/recovery.txt"\n'):
        (tmp_path / "particle.toml").write_text(text)
        assert run("validate") == (0, "ok\n", "")


def test_unknown_encryption(run: Run, tmp_path: Path) -> None:
    assert problems(run, tmp_path, GOOD + '[image]\nencrypt = "luks"\n') == [
        "particle.toml: image.encrypt: bad value 'luks' (allowed: off, tpm2)"]


def test_recovery_key_needs_an_encrypted_root(run: Run, tmp_path: Path) -> None:
    assert problems(run, tmp_path, GOOD + '[image]\nrecovery_key = "/root/key"\n') == [
        'particle.toml: image.recovery_key: a recovery key is only made for an encrypted root, '
        'and image.encrypt is "off" (allowed: only with encrypt = "tpm2")',
        'hint: set image.encrypt = "tpm2", or remove image.recovery_key',
    ]


def test_recovery_key_destination_must_be_an_absolute_file(run: Run, tmp_path: Path) -> None:
    for bad in ("keys/recovery.txt", "/var/lib/", "screen"):
        text = GOOD + f'[image]\nencrypt = "tpm2"\nrecovery_key = "{bad}"\n'
        assert problems(run, tmp_path, text) == [
            f"particle.toml: image.recovery_key: bad recovery key destination '{bad}' "
            '(allowed: "console" or an absolute file path on the machine)',
        ]


def test_recovery_key_destination_without_spaces_or_percent(run: Run, tmp_path: Path) -> None:
    """The path goes unquoted into the recovery-key unit's ExecStart=: systemd would split it at
    a space and expand a %."""
    for bad in ("/efi/my key.txt", "/efi/key\\t.txt", "/efi/key%H.txt"):
        text = GOOD + f'[image]\nencrypt = "tpm2"\nrecovery_key = "{bad}"\n'
        shown = "/efi/key\t.txt" if "\\t" in bad else bad
        lines = problems(run, tmp_path, text)
        assert lines[0] == (
            f"particle.toml: image.recovery_key: recovery key destination {shown!r} has a space "
            "or a '%' (allowed: a path without either: systemd would split or expand it in the "
            "recovery-key unit's ExecStart=)")
        assert lines[1].startswith("hint: choose a path without spaces and '%'")


def test_encryption_needs_trixie_and_room_for_the_header(run: Run, tmp_path: Path) -> None:
    text = (GOOD + 'release = "bookworm"\n[image]\nencrypt = "tpm2"\nroot_size = "24M"\n')
    lines = problems(run, tmp_path, text)
    assert lines[:2] == [
        "particle.toml: image.root_size: 24 MiB is too small: the root partition holds the "
        "factory /etc and /var and, encrypted, a 16 MiB LUKS2 header (allowed: at least 32 MiB)",
        "particle.toml: image.encrypt: an encrypted root needs systemd 257's repart and "
        "cryptenroll, which bookworm (systemd 252) lacks (allowed with release = \"trixie\")",
    ]
    assert 'hint: set system.release = "trixie", or image.encrypt = "off"' in lines


# --- build ------------------------------------------------------------------------------------


def test_packages_and_definitions_only_when_encrypted(tmp_path: Path) -> None:
    assert not set(encryption.TPM2_PACKAGES) & set(extra_packages(spec()))
    assert set(encryption.TPM2_PACKAGES) <= set(extra_packages(spec(encrypt="tpm2")))

    class Ctx:  # the two fields the stage reads
        def __init__(self, s: Spec) -> None:
            self.spec, self.tree = s, tmp_path / "tree"

    encryption.encrypted_root(Ctx(spec()))  # type: ignore[arg-type]
    assert not (tmp_path / "tree").exists()
    encrypted = Ctx(spec(encrypt="tpm2", recovery_key="/efi/key"))
    repart.root_partition(encrypted)  # type: ignore[arg-type]
    encryption.encrypted_root(encrypted)  # type: ignore[arg-type]
    definition = (tmp_path / "tree" / repart.ROOT_DEFINITION).read_text()
    lines = set(definition.splitlines())
    assert {"Type=root", "Format=ext4", "Encrypt=tpm2", "TPM2PCRs=7"} <= lines
    assert not any(line.startswith("SizeMaxBytes") for line in lines)  # all the free space
    units = tmp_path / "tree/usr/lib/systemd/system"
    unit = (units / encryption.RECOVERY_UNIT).read_text()
    assert "ExecStart=/usr/bin/particle encryption recovery-key --to /efi/key" in unit
    assert f"ConditionPathExists=!{machine_enc.DONE}" in unit
    assert (units / "multi-user.target.wants" / encryption.RECOVERY_UNIT).resolve() == \
        (units / encryption.RECOVERY_UNIT).resolve()


def test_disk_leaves_free_space_for_the_root(tmp_path: Path) -> None:
    """No root partition; `free_space` after the last one, which the GPT covers."""
    parts = [Partition("esp", PartType.ESP, uuid.uuid4(), 8 * MiB)]
    disk = tmp_path / "disk.raw"
    write_disk(disk, parts, uuid.uuid4(), free_space=100 * MiB)
    table = read_table(disk)
    assert [p["type"].lower() for p in table] == [str(PartType.ESP)]
    dump = json.loads(subprocess.run(["sfdisk", "--json", str(disk)], capture_output=True,
                                     check=True).stdout)["partitiontable"]
    free_sectors = dump["lastlba"] - (table[0]["start"] + table[0]["size"]) + 1
    assert free_sectors * 512 >= 100 * MiB


# --- machine side: a real LUKS2 header -------------------------------------------------------


@pytest.fixture(scope="module")
def luks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LUKS2 volume in a file with a passphrase slot, and one slot carrying a systemd-tpm2
    token bound to PCR 7 (the fields systemd-repart writes)."""
    d = tmp_path_factory.mktemp("luks")
    vol = d / "root.luks"
    with vol.open("wb") as f:
        f.truncate(32 * MiB)
    fast = ["--batch-mode", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]
    key = d / "key"
    key.write_text("first")
    subprocess.run(["cryptsetup", "luksFormat", "--type", "luks2", *fast, "--key-file",
                    str(key), str(vol)], check=True, capture_output=True)
    (d / "second").write_text("second")
    subprocess.run(["cryptsetup", "luksAddKey", *fast, "--key-file", str(key), str(vol),
                    str(d / "second")], check=True, capture_output=True)
    token = {"type": "systemd-tpm2", "keyslots": ["1"], "tpm2-blob": "AA==",
             "tpm2-pcrs": [7], "tpm2-pcr-bank": "sha256", "tpm2-primary-alg": "ecc",
             "tpm2-policy-hash": "00", "tpm2-pin": False}
    (d / "token.json").write_text(json.dumps(token))
    subprocess.run(["cryptsetup", "token", "import", "--json-file", str(d / "token.json"),
                    str(vol)], check=True, capture_output=True)
    return vol


def test_reads_how_a_luks2_volume_unlocks(luks: Path) -> None:
    state = machine_enc.describe(machine_enc.read_luks2(str(luks)))
    assert state == {"tpm2": True, "tpm2_pcrs": [7], "recovery_key": False, "keyslots": 2,
                     "unlock": ["tpm2 (PCR 7)", "passphrase (1 key slot)"]}
    shown = machine_enc.render_root({"encrypted": True, "device": "/dev/vda6",
                                     "type": "LUKS2"} | state)
    assert shown == ("root:       encrypted, LUKS2 on /dev/vda6; unlocks with tpm2 (PCR 7), "
                     "passphrase (1 key slot); no recovery key yet")


def test_not_a_luks2_header(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_bytes(bytes(8192))
    with pytest.raises(ValueError, match="no LUKS2 header"):
        machine_enc.read_luks2(str(plain))
    assert machine_enc.render_root({"encrypted": False}) == "root:       not encrypted"


def test_recovery_key_is_found_in_cryptenroll_output() -> None:
    key = "unvggkjf-vnlffueb-leuetnln-ktceutnf-jekninve-hjrrllvl-cklelcjl-tblkctle"
    text = f"A secret recovery key has been generated for this volume:\n\n    \U0001f510 {key}\n"
    m = machine_enc.RECOVERY_KEY.search(text)
    assert m is not None and m.group(0) == key
