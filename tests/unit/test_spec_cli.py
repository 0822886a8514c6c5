"""Spec problems through the real `particle` entry point: exit status 2, one line per problem
naming file and key, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from .conftest import Result, Run

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*/particle.toml"))
GOOD = """\
[system]
id = "demo"
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def spec_error(run: Run, tmp_path: Path, text: str, *args: str) -> list[str]:
    """Validate `text` as ./particle.toml; expect exit status 2 and return the problem lines."""
    write(tmp_path / "particle.toml", text)
    result = run("validate", *args)
    assert result.code == 2, result
    assert result.out == ""
    return result.err.splitlines()


def test_valid_spec_prints_ok(run: Run, tmp_path: Path) -> None:
    write(tmp_path / "particle.toml", GOOD)
    assert run("validate") == Result(0, "ok\n", "")


def test_toml_syntax_error_has_line_and_column(run: Run, tmp_path: Path) -> None:
    lines = spec_error(run, tmp_path, '[system]\nid = "x"\nversion = \n')
    assert lines == ["particle.toml: line 3, column 11: Invalid value"]


def test_toml_syntax_errors_in_includes_are_all_reported(run: Run, tmp_path: Path) -> None:
    write(tmp_path / "inc/a.toml", "a = [1,\n")
    write(tmp_path / "inc/b.toml", 'x = "open\n')
    lines = spec_error(run, tmp_path, 'include = ["inc/a.toml", "inc/b.toml"]\n' + GOOD)
    assert lines == [
        "inc/a.toml: line 1, column 5: the array opened here is never closed "
        "(Invalid value at end of file)",
        "inc/b.toml: line 1, column 10: Illegal character '\\n'",
    ]


def test_wrong_type_in_list(run: Run, tmp_path: Path) -> None:
    text = GOOD + '[packages]\ninstall = ["less", "vim", "curl", 42]\n'
    assert spec_error(run, tmp_path, text) == [
        "particle.toml: packages.install[3]: expected a string, got 42"
    ]


def test_wrong_type_table_and_list(run: Run, tmp_path: Path) -> None:
    text = 'kernel = "quiet"\n' + GOOD + '[services]\nenable = "ssh.service"\n'
    assert spec_error(run, tmp_path, text) == [
        "particle.toml: services.enable: expected a list, got \"ssh.service\"",
        "particle.toml: kernel: expected a table, got \"quiet\"",
    ]


def test_unknown_key_did_you_mean(run: Run, tmp_path: Path) -> None:
    text = GOOD + '[pacakges]\ninstall = ["less"]\n'
    assert spec_error(run, tmp_path, text) == [
        "particle.toml: pacakges: unknown key 'pacakges' (did you mean 'packages'?)"
    ]


def test_unknown_key_lists_allowed_keys(run: Run, tmp_path: Path) -> None:
    text = GOOD + "[update]\nzzz = 1\n"
    assert spec_error(run, tmp_path, text) == [
        "particle.toml: update.zzz: unknown key 'zzz' (allowed: source, tries)"
    ]


def test_bad_release(run: Run, tmp_path: Path) -> None:
    assert spec_error(run, tmp_path, GOOD + 'release = "sid"\n') == [
        "particle.toml: system.release: bad value 'sid' (allowed: bookworm, trixie)"
    ]


def test_missing_include(run: Run, tmp_path: Path) -> None:
    lines = spec_error(run, tmp_path, 'include = ["base.toml", "gone.toml"]\n' + GOOD)
    assert lines == [
        "particle.toml: include[0]: file not found: base.toml (looked for base.toml)",
        "particle.toml: include[1]: file not found: gone.toml (looked for gone.toml)",
    ]


def test_include_cycle(run: Run, tmp_path: Path) -> None:
    write(tmp_path / "b.toml", 'include = ["particle.toml"]\n')
    lines = spec_error(run, tmp_path, 'include = ["b.toml"]\n' + GOOD)
    assert lines == [
        "b.toml: include[0]: include cycle: particle.toml -> b.toml -> particle.toml"
    ]


def test_bad_include_values(run: Run, tmp_path: Path) -> None:
    assert spec_error(run, tmp_path, 'include = "b.toml"\n' + GOOD) == [
        'particle.toml: include: expected a list, got "b.toml"'
    ]
    assert spec_error(run, tmp_path, "include = [1]\n" + GOOD) == [
        "particle.toml: include[0]: expected a string, got 1"
    ]


def test_error_in_included_file_names_that_file(run: Run, tmp_path: Path) -> None:
    write(tmp_path / "common/base.toml", '[image]\nroot_size = "lots"\n')
    lines = spec_error(run, tmp_path, 'include = ["common/base.toml"]\n' + GOOD)
    assert lines == [
        "common/base.toml: image.root_size: bad size 'lots' "
        '(allowed: a number with K, M, G or T, e.g. "512M")'
    ]


def test_bad_size(run: Run, tmp_path: Path) -> None:
    lines = spec_error(run, tmp_path, GOOD + '[image]\nusr_slot_size = "2X"\n')
    assert lines == [
        "particle.toml: image.usr_slot_size: bad size '2X' "
        '(allowed: a number with K, M, G or T, e.g. "512M")'
    ]


def test_bad_version(run: Run, tmp_path: Path) -> None:
    lines = spec_error(run, tmp_path, '[system]\nid = "x"\nversion = "1_0"\n')
    assert lines == [
        "particle.toml: system.version: bad version '1_0' "
        "(allowed: \"auto\" or letters, digits and . ~ ^ + -; no '_')"
    ]


def test_bad_unit_name(run: Run, tmp_path: Path) -> None:
    lines = spec_error(run, tmp_path, GOOD + '[services]\nenable = ["ok.service", "sshd"]\n')
    assert len(lines) == 1
    assert lines[0].startswith("particle.toml: services.enable[1]: bad unit name 'sshd' (allowed:")


def test_bad_id(run: Run, tmp_path: Path) -> None:
    lines = spec_error(run, tmp_path, '[system]\nid = "my_box"\n[users."bad user"]\n')
    assert lines == [
        "particle.toml: system.id: bad id 'my_box' (allowed: letters, digits and '-')",
        "particle.toml: users.\"bad user\": bad id 'bad user' (allowed: letters, digits and '-')",
    ]


def test_several_problems_at_once(run: Run, tmp_path: Path) -> None:
    text = """\
        [system]
        id = "x"
        release = "sid"
        colour = "blue"
        [packages]
        install = ["less", 42]
        [files]
        "/etc/motd" = { content = "hi", mode = "999" }
        "/etc/issue" = {}
        [image]
        usr_slot_size = "2X"
        [update]
        tries = 0
        [extensions.dev]
        packages = "gcc"
        """
    lines = spec_error(run, tmp_path, text)
    assert [line.split(": ")[1] for line in lines] == [
        "system.release",
        "system.colour",
        "packages.install[1]",
        'files."/etc/motd".mode',
        'files."/etc/issue"',
        "image.usr_slot_size",
        "update.tries",
        "extensions.dev.packages",
    ]
    assert all(line.startswith("particle.toml: ") for line in lines)
    assert "particle.toml: update.tries: bad value 0 (must be at least 1)" in lines
    assert "particle.toml: files.\"/etc/issue\": give exactly one of 'content' or 'source'" in lines


def test_missing_spec_file(run: Run) -> None:
    result = run("validate", "nope.toml")
    assert result.code == 2
    assert result.err.startswith("nope.toml: no such spec file")


def test_set_and_profile_options(run: Run, tmp_path: Path) -> None:
    write(tmp_path / "profiles/debug.toml", '[kernel]\ncmdline = ["debug"]\n')
    write(tmp_path / "particle.toml", GOOD)
    result = run("summary", "--json", "--profile", "debug", "--set", "system.version=5")
    resolved = json.loads(result.out)
    assert resolved["system"]["version"] == "5"
    assert resolved["kernel"]["cmdline"] == ["debug"]
    result = run("validate", "--set", "update.tries=99", "--set", "oops")
    assert result.code == 2
    assert result.err == "--set oops: expected KEY=VALUE, e.g. --set system.version=5\n"
    result = run("validate", "--set", "update.tries=99")
    assert result.err.splitlines() == [
        "--set update.tries: update.tries: bad value 99 (must be at most 10)"
    ]


def test_summary_json_shows_merged_includes(run: Run, tmp_path: Path) -> None:
    write(tmp_path / "base.toml", '[packages]\ninstall = ["less"]\n[kernel]\ncmdline = ["quiet"]\n')
    write(
        tmp_path / "particle.toml",
        'include = ["base.toml"]\n' + GOOD + '[packages]\ninstall = ["vim", "less"]\n',
    )
    result = run("summary", "--json")
    assert result.code == 0
    resolved = json.loads(result.out)
    assert resolved["packages"]["install"] == ["less", "vim"]
    assert resolved["kernel"]["cmdline"] == ["quiet"]
    assert resolved["system"]["id"] == "demo"
    text = run("summary").out
    assert "less, vim" in text


def test_schema_is_json_with_system(run: Run) -> None:
    result = run("schema")
    assert result.code == 0
    schema = json.loads(result.out)
    assert "system" in schema["properties"]
    assert "include" in schema["properties"]


def test_init_writes_a_valid_spec(run: Run, tmp_path: Path) -> None:
    result = run("init", "my box")
    assert result.code == 0
    assert "my box/particle.toml" in result.out
    assert run("validate", "my box").out == "ok\n"
    assert run("validate", "my box", "--profile", "debug").out == "ok\n"
    resolved = json.loads(run("summary", "--json", "my box").out)
    assert resolved["system"]["id"] == "my-box"
    again = run("init", "my box")
    assert again.code == 1
    assert "refusing to overwrite" in again.err
    assert run("init", "other", "--id", "custom-id").code == 0
    assert json.loads(run("summary", "--json", "other").out)["system"]["id"] == "custom-id"


@pytest.mark.parametrize("spec", EXAMPLES, ids=[p.parent.name for p in EXAMPLES])
def test_examples_validate(run: Run, spec: Path) -> None:
    assert run("validate", str(spec)).out == "ok\n"
    for profile in sorted((spec.parent / "profiles").glob("*.toml")):
        assert run("validate", str(spec), "--profile", profile.stem).out == "ok\n"


def test_examples_exist() -> None:
    assert {p.parent.name for p in EXAMPLES} >= {"minimal", "composed"}


def _bad_spec(tmp_path: Path) -> Path:
    text = GOOD + '[packages]\ninstall = ["a1", "b1", "c1", 42]\n'
    return write(tmp_path / "particle.toml", text)


def test_python_dash_m(tmp_path: Path) -> None:
    spec = _bad_spec(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "particleos", "validate", str(spec)],
        capture_output=True, text=True, cwd=tmp_path, check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr == "particle.toml: packages.install[3]: expected a string, got 42\n"


def test_console_script(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "particle"
    if not script.exists():
        pytest.skip("the particle console script is not installed in this environment")
    _bad_spec(tmp_path)
    proc = subprocess.run(
        [str(script), "validate"], capture_output=True, text=True, cwd=tmp_path, check=False
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stderr == "particle.toml: packages.install[3]: expected a string, got 42\n"
