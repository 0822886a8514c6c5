"""Problems the spec alone decides (spec.checks), through the real `particle` entry point:
exit status 2, the file that set the key and the key named, a hint where there is something to
run, never a traceback; and `particle build` stops with the same lines before any work."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from .conftest import Run

GOOD = '[system]\nid = "demo"\n'
def write(path: Path, text: str = "x\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def problems(run: Run, tmp_path: Path, text: str) -> list[str]:
    """Validate `text` as ./particle.toml: exit 2, nothing on stdout; the stderr lines."""
    write(tmp_path / "particle.toml", text)
    code, out, err = run("validate")
    assert (code, out) == (2, ""), err
    return err.splitlines()


def keys(tmp_path: Path) -> str:
    """A [signing] table whose three files exist (contents do not matter before a build)."""
    for name in ("owner.key", "owner.crt", "owner.pgp"):
        write(tmp_path / "keys" / name)
    return ('[signing]\nkey = "keys/owner.key"\ncertificate = "keys/owner.crt"\n'
            'openpgp_key = "keys/owner.pgp"\n')


def test_missing_tree_and_a_tree_that_is_a_file(run: Run, tmp_path: Path) -> None:
    write(tmp_path / "plain.txt")
    assert problems(run, tmp_path, GOOD + '[files]\ntrees = ["overlay/", "plain.txt"]\n') == [
        "particle.toml: files.trees[0]: overlay does not exist (allowed: an existing directory)",
        "particle.toml: files.trees[1]: plain.txt is not a directory "
        "(allowed: a directory copied over /)",
    ]


def test_missing_file_source(run: Run, tmp_path: Path) -> None:
    text = GOOD + '[files]\n"/etc/motd" = { source = "motd.txt" }\n'
    assert problems(run, tmp_path, text) == [
        'particle.toml: files."/etc/motd".source: motd.txt does not exist '
        "(allowed: an existing file)",
    ]


def test_unreadable_file_source_and_a_directory_source(run: Run, tmp_path: Path) -> None:
    if os.geteuid() == 0:
        unreadable = "/proc/self/mem"  # a regular file even root cannot read from the start
        expected = f"{unreadable} cannot be read: Input/output error"
    else:
        unreadable = str(write(tmp_path / "secret.txt"))
        os.chmod(unreadable, 0)
        expected = "secret.txt is not readable by this user (allowed: a readable file)"
    (tmp_path / "adir").mkdir()
    text = GOOD + (f'[files]\n"/etc/a" = {{ source = "{unreadable}" }}\n'
                   '"/etc/b" = { source = "adir" }\n')
    assert problems(run, tmp_path, text) == [
        f'particle.toml: files."/etc/a".source: {expected}',
        'particle.toml: files."/etc/b".source: adir is not a regular file (allowed: a file)',
    ]


@pytest.mark.parametrize("key", ["key", "certificate", "openpgp_key"])
def test_missing_signing_file_names_the_key_and_hints_genkey(
    run: Run, tmp_path: Path, key: str
) -> None:
    text = GOOD + keys(tmp_path)
    (tmp_path / "keys" / {"key": "owner.key", "certificate": "owner.crt",
                          "openpgp_key": "owner.pgp"}[key]).unlink()
    lines = problems(run, tmp_path, text)
    assert lines[0].startswith(f"particle.toml: signing.{key}: keys/owner.")
    assert lines[0].endswith(" does not exist (allowed: an existing file)")
    assert lines[1:] == ["hint: create keys with: particle genkey keys"]


def test_missing_update_key(run: Run, tmp_path: Path) -> None:
    text = GOOD + keys(tmp_path) + 'update_keys = ["keys/old.pgp"]\n'
    assert problems(run, tmp_path, text) == [
        "particle.toml: signing.update_keys[0]: keys/old.pgp does not exist "
        "(allowed: an existing file)",
        "hint: export a public key with: gpg --export KEYID > FILE",
    ]


def test_update_keys_without_an_openpgp_key(run: Run, tmp_path: Path) -> None:
    write(tmp_path / "old.pgp")
    assert problems(run, tmp_path, GOOD + '[signing]\nupdate_keys = ["old.pgp"]\n') == [
        "particle.toml: signing.update_keys: update keys are trusted in addition to "
        "signing.openpgp_key, which is not set (allowed: only together with openpgp_key)",
    ]


def test_key_without_its_certificate(run: Run, tmp_path: Path) -> None:
    write(tmp_path / "keys/owner.key")
    assert problems(run, tmp_path, GOOD + '[signing]\nkey = "keys/owner.key"\n') == [
        "particle.toml: signing.certificate: missing: signing.key is set (give both key and "
        "certificate, or neither for an unsigned image)",
        "hint: create keys with: particle genkey keys",
    ]


def test_signed_updates_need_an_openpgp_key(run: Run, tmp_path: Path) -> None:
    signing = keys(tmp_path).replace('openpgp_key = "keys/owner.pgp"\n', "")
    text = GOOD + signing + '[update]\nsource = "https://updates.example/demo/"\n'
    assert problems(run, tmp_path, text) == [
        "particle.toml: signing.openpgp_key: missing: required when the image is signed and "
        "[update] source is set (a signed machine must not accept unsigned updates)",
        "hint: `particle genkey` writes one; add its openpgp_key line to [signing]",
    ]


def test_version_characters(run: Run, tmp_path: Path) -> None:
    updates = '[update]\nsource = "https://updates.example/demo/"\n'
    assert problems(run, tmp_path, GOOD + 'version = "1.0+git"\n' + updates) == [
        "particle.toml: system.version: version '1.0+git' contains '+', which boot counting "
        "uses in UKI file names (NAME+LEFT-DONE.efi) (allowed with [update] source: letters, "
        "digits and . ~ ^ -)",
        "hint: choose a version without '+'",
    ]
    assert problems(run, tmp_path, GOOD + 'version = "1_0"\n') == [
        "particle.toml: system.version: bad version '1_0' (allowed: \"auto\" or letters, digits "
        "and . ~ ^ + -; no '_')",
    ]
    # '+' is fine without updates, and "auto" (a timestamp) is fine with them.
    for text in (GOOD + 'version = "1.0+git"\n', GOOD + updates):
        write(tmp_path / "particle.toml", text)
        assert run("validate") == (0, "ok\n", "")


def test_sizes_that_cannot_hold_the_content(run: Run, tmp_path: Path) -> None:
    text = GOOD + '[image]\nesp_size = "64M"\nusr_slot_size = "32M"\nroot_size = "8M"\n'
    lines = problems(run, tmp_path, text)
    assert lines[:3] == [
        "particle.toml: image.esp_size: 64 MiB is too small: the ESP holds two unified kernel "
        "images of ~35 MiB (A and B) and the boot loader (allowed: at least 72 MiB)",
        "particle.toml: image.usr_slot_size: 32 MiB is too small: a /usr slot holds a "
        "compressed Debian /usr, ~100 MiB for a minimal image (allowed: at least 64 MiB)",
        "particle.toml: image.root_size: 8 MiB is too small: the root partition holds the "
        "factory /etc and /var (allowed: at least 16 MiB)",
    ]
    assert 'hint: set image.esp_size = "72M" or more' in lines[3:]


def test_partition_label_too_long(run: Run, tmp_path: Path) -> None:
    long_id = "a-very-long-image-identifier"  # 28 + "_" + 14 timestamp digits > 36
    assert problems(run, tmp_path, f'[system]\nid = "{long_id}"\n') == [
        f"particle.toml: system.id: the partition label '{long_id}_YYYYMMDDHHMMSS' "
        "(ID_VERSION) is 43 characters (allowed: at most 36, the GPT limit)",
        "hint: shorten system.id or system.version",
    ]
    version = "2026.12.01-rc1.build42-with-a-long-tail"
    lines = problems(run, tmp_path, f'[system]\nid = "demo"\nversion = "{version}"\n')
    assert lines[0].startswith("particle.toml: system.version: the partition label")


def test_toml_error_has_line_and_column(run: Run, tmp_path: Path) -> None:
    assert problems(run, tmp_path, GOOD + 'version = "1"\nrelease = trixie\n') == [
        "particle.toml: line 4, column 11: Invalid value",
    ]


@pytest.mark.parametrize(
    ("opening", "expected"),
    [
        ('install = [\n  "less",\n  "vim",\n', "line 4, column 11: the array"),
        ('install = ["less"]\n[system.x]\nmotd = """\nhello\n',
         "line 6, column 8: the multi-line string"),
        ("install = ['''\nless\n", "line 4, column 12: the multi-line string"),
    ],
)
def test_construct_left_open_is_reported_where_it_began(
    run: Run, tmp_path: Path, opening: str, expected: str
) -> None:
    lines = problems(run, tmp_path, GOOD + "[packages]\n" + opening + "# a comment ]\n\n")
    assert len(lines) == 1 and lines[0].startswith(f"particle.toml: {expected} opened here "
                                                  "is never closed ("), lines


def test_problem_in_an_included_file_names_that_file(run: Run, tmp_path: Path) -> None:
    write(tmp_path / "common/base.toml", '[files]\ntrees = ["overlay"]\n')
    (tmp_path / "overlay").mkdir()  # next to particle.toml: not what base.toml means
    write(tmp_path / "common/keys.toml", '[signing]\nkey = "../keys/owner.key"\n')
    text = 'include = ["common/base.toml", "common/keys.toml"]\n' + GOOD
    assert problems(run, tmp_path, text)[:3] == [
        "common/base.toml: files.trees[0]: common/overlay does not exist "
        "(allowed: an existing directory)",
        "common/keys.toml: signing.key: keys/owner.key does not exist (allowed: an existing file)",
        "common/keys.toml: signing.certificate: missing: signing.key is set (give both key and "
        "certificate, or neither for an unsigned image)",
    ]


def test_set_override_is_named_as_the_origin(run: Run, tmp_path: Path) -> None:
    write(tmp_path / "particle.toml", GOOD)
    code, _, err = run("validate", "--set", "files.trees=['missing']")
    assert code == 2
    assert err.splitlines() == [
        "--set files.trees: files.trees[0]: missing does not exist (allowed: an existing directory)"
    ]


def test_build_fails_with_the_same_lines_before_any_work(tmp_path: Path) -> None:
    """No cache directory appears and mmdebstrap never runs (a fake one would leave a mark)."""
    spec = write(tmp_path / "sys/particle.toml",
                 GOOD + '[files]\ntrees = ["overlay"]\n[image]\nesp_size = "40M"\n')
    bin_dir = tmp_path / "bin"
    mark = tmp_path / "mmdebstrap-ran"
    write(bin_dir / "mmdebstrap", f"#!/bin/sh\ntouch {mark}\n").chmod(0o755)
    cache = tmp_path / "cache"
    env = {**os.environ, "PARTICLE_CACHE_DIR": str(cache),
           "PATH": f"{bin_dir}:{os.environ['PATH']}"}

    def particle(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "particleos", *args], cwd=spec.parent,
                              env=env, capture_output=True, text=True, check=False)

    validate, build = particle("validate"), particle("build")
    assert validate.returncode == build.returncode == 2
    assert build.stderr == validate.stderr
    assert build.stderr.splitlines()[0] == (
        "particle.toml: files.trees[0]: overlay does not exist (allowed: an existing directory)"
    )
    assert "Traceback" not in build.stderr and build.stdout == ""
    assert not cache.exists() and not mark.exists()
    assert not (spec.parent / "out").exists()


def test_model_problems_and_input_problems_are_reported_together(
    run: Run, tmp_path: Path
) -> None:
    text = (GOOD + '[packages]\ninstal = ["less"]\n[files]\ntrees = ["overlay"]\n'
            '[image]\nroot_size = "lots"\n')
    assert problems(run, tmp_path, text) == [
        "particle.toml: packages.instal: unknown key 'instal' (did you mean 'install'?)",
        'particle.toml: image.root_size: bad size \'lots\' (allowed: a number with K, M, G or T, '
        'e.g. "512M")',
        "particle.toml: files.trees[0]: overlay does not exist (allowed: an existing directory)",
    ]
