"""The spec loader as a library: merging, includes, profiles, overrides, paths, helpers."""

from __future__ import annotations

import json
import re
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from particleos.errors import SpecError
from particleos.spec import (
    json_schema,
    load_spec,
    resolve_spec_path,
    resolved_version,
    spec_digest,
    summary_text,
)
from particleos.spec.errors import format_value, key_path
from particleos.spec.summary import format_size

Write = Callable[[str, str], Path]


@pytest.fixture
def write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Write:
    """Write a dedented file below tmp_path (the working directory) and return its path."""
    monkeypatch.chdir(tmp_path)

    def _write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
        return path

    return _write


def problems(excinfo: pytest.ExceptionInfo[SpecError]) -> list[str]:
    return excinfo.value.problems


MINIMAL = '[system]\nid = "demo"\n'


def test_minimal_spec_gets_defaults(write: Write) -> None:
    spec = load_spec(write("particle.toml", MINIMAL))
    assert spec.system.id == "demo"
    assert spec.system.version == "auto"
    assert spec.system.release == "trixie"
    assert spec.image.usr_slot_size == 1 << 30
    assert spec.image.compression == "lz4hc"
    assert spec.update.tries == 3


def test_include_merge_rules(write: Write) -> None:
    write(
        "base.toml",
        """
        [system]
        id = "base"
        release = "bookworm"
        [packages]
        install = ["less", "vim"]
        [users.admin]
        groups = ["sudo"]
        [image]
        usr_slot_size = "2G"
        """,
    )
    top = write(
        "particle.toml",
        """
        include = ["base.toml"]
        [system]
        id = "top"
        [packages]
        install = ["curl", "less", "curl"]
        [users.admin]
        groups = ["adm", "sudo"]
        [users.guest]
        """,
    )
    spec = load_spec(top)
    assert spec.system.id == "top"  # scalar replaced by the later file
    assert spec.system.release == "bookworm"  # table merged key by key
    assert spec.packages.install == ["less", "vim", "curl"]  # appended, no duplicates
    assert spec.users["admin"].groups == ["sudo", "adm"]
    assert set(spec.users) == {"admin", "guest"}
    assert spec.image.usr_slot_size == 2 << 30


def test_nested_includes_apply_depth_first_in_order(write: Write) -> None:
    write("sub/c.toml", '[kernel]\ncmdline = ["c"]\n[system]\nid = "c"\n')
    write("sub/b.toml", 'include = ["c.toml"]\n[kernel]\ncmdline = ["b"]\n[system]\nid = "b"\n')
    write("d.toml", '[kernel]\ncmdline = ["d"]\n[system]\nid = "d"\n')
    top = write("particle.toml", 'include = ["sub/b.toml", "d.toml"]\n[kernel]\ncmdline = ["a"]\n')
    spec = load_spec(top)
    assert spec.kernel.cmdline == ["c", "b", "d", "a"]
    assert spec.system.id == "d"


def test_profiles_apply_after_spec_in_given_order(write: Write) -> None:
    write("profiles/common.toml", '[packages]\ninstall = ["strace"]\n')
    write("profiles/one.toml", 'include = ["common.toml"]\n[system]\nid = "one"\n')
    write("profiles/two.toml", '[system]\nid = "two"\n[packages]\ninstall = ["less"]\n')
    top = write("particle.toml", MINIMAL)
    assert load_spec(top, profiles=["one"]).system.id == "one"
    spec = load_spec(top, profiles=["one", "two"])
    assert spec.system.id == "two"
    assert spec.packages.install == ["strace", "less"]


def test_unknown_profile_lists_available(write: Write) -> None:
    write("profiles/debug.toml", "")
    top = write("particle.toml", MINIMAL)
    with pytest.raises(SpecError) as excinfo:
        load_spec(top, profiles=["nope"])
    assert problems(excinfo) == [
        "particle.toml: --profile nope: unknown profile (available: debug)"
    ]


def test_overrides(write: Write) -> None:
    top = write("particle.toml", MINIMAL + '[packages]\ninstall = ["less"]\n')
    spec = load_spec(
        top,
        overrides=[
            "system.version=5",
            "image.usr_slot_size=2G",
            'packages.install=["vim","git"]',
            "system.hostname=1.10",
            'files."/etc/motd".content=hello',
            "update.tries=5",
        ],
    )
    assert spec.system.version == "5"
    assert spec.image.usr_slot_size == 2 << 30
    assert spec.packages.install == ["vim", "git"]  # replaced, not appended
    assert spec.system.hostname == "1.10"  # a float would have lost the 0
    assert spec.files.entries["/etc/motd"].content == "hello"
    assert spec.update.tries == 5


def test_int_version_in_file_is_a_string(write: Write) -> None:
    spec = load_spec(write("particle.toml", '[system]\nid = "x"\nversion = 7\n'))
    assert spec.system.version == "7"


def test_malformed_override(write: Write) -> None:
    top = write("particle.toml", MINIMAL)
    with pytest.raises(SpecError) as excinfo:
        load_spec(top, overrides=["system.version", "a b=1", 'include=["x.toml"]'])
    assert problems(excinfo) == [
        "--set system.version: expected KEY=VALUE, e.g. --set system.version=5",
        "--set a b=1: bad key 'a b' (expected a dotted key such as system.version)",
        '--set include=["x.toml"]: include cannot be overridden (use --profile instead)',
    ]


def test_relative_paths_resolve_against_declaring_file(write: Write, tmp_path: Path) -> None:
    write(
        "inc/base.toml",
        """
        [files]
        trees = ["overlay/"]
        "/etc/a" = { source = "a.txt" }
        [signing]
        key = "../keys/p.key"
        certificate = "ABS/p.crt"
        openpgp_key = "../keys/p.pgp"
        [update]
        source = "updates"
        """.replace("ABS", f"{tmp_path}/abs"),
    )
    for name in ("inc/a.txt", "keys/p.key", "keys/p.pgp", "abs/p.crt"):
        write(name, "x")
    (tmp_path / "inc/overlay").mkdir()
    top = write("particle.toml", 'include = ["inc/base.toml"]\n' + MINIMAL)
    spec = load_spec(top)
    assert spec.files.trees == [f"{tmp_path}/inc/overlay/"]
    assert spec.files.entries["/etc/a"].source == f"{tmp_path}/inc/a.txt"
    assert spec.signing.key == f"{tmp_path}/keys/p.key"
    assert spec.signing.certificate == f"{tmp_path}/abs/p.crt"
    assert spec.update.source == f"{tmp_path}/inc/updates"


def test_url_update_source_and_override_paths(
    write: Write, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    top = write("conf/particle.toml", MINIMAL + '[update]\nsource = "https://u.example/x/"\n')
    assert load_spec(top).update.source == "https://u.example/x/"
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    for name in ("k.key", "k.crt"):
        (tmp_path / "elsewhere" / name).write_text("x")
    plain = write("conf/plain.toml", MINIMAL)
    spec = load_spec(plain, overrides=["signing.key=k.key", "signing.certificate=k.crt"])
    assert spec.signing.key == f"{tmp_path}/elsewhere/k.key"


def test_error_names_including_file_and_its_own_index(write: Write) -> None:
    write("base.toml", '[packages]\ninstall = ["less", 42]\n')
    top = write(
        "particle.toml", 'include = ["base.toml"]\n[system]\nid = "x"\n'
        '[packages]\ninstall = ["vim", "less", "curl", 7]\n'
    )
    with pytest.raises(SpecError) as excinfo:
        load_spec(top)
    assert problems(excinfo) == [
        "base.toml: packages.install[1]: expected a string, got 42",
        "particle.toml: packages.install[3]: expected a string, got 7",
    ]


def test_missing_required_key_names_top_level_file(write: Write) -> None:
    write("base.toml", '[system]\nrelease = "trixie"\n')
    with pytest.raises(SpecError) as excinfo:
        load_spec(write("particle.toml", 'include = ["base.toml"]\n'))
    assert problems(excinfo) == ["particle.toml: system.id: missing required key"]


def test_override_error_is_labelled_with_the_option(write: Write) -> None:
    with pytest.raises(SpecError) as excinfo:
        load_spec(write("particle.toml", MINIMAL), overrides=["system.version=1_0"])
    assert problems(excinfo)[0].startswith("--set system.version: system.version: bad version")


def test_files_keys_must_be_absolute_paths(write: Write) -> None:
    spec_text = MINIMAL + '[files]\ntree = ["x"]\n"etc/motd" = { content = "x" }\n'
    with pytest.raises(SpecError) as excinfo:
        load_spec(write("particle.toml", spec_text))
    assert problems(excinfo) == [
        "particle.toml: files.tree: unknown key 'tree' (did you mean 'trees'?)",
        "particle.toml: files.\"etc/motd\": bad key 'etc/motd' "
        "(allowed: 'trees' or an absolute path such as \"/etc/motd\")",
    ]


def test_compression_must_fit_filesystem(write: Write) -> None:
    text = MINIMAL + '[image]\nfilesystem = "squashfs"\ncompression = "lz4hc"\n'
    with pytest.raises(SpecError, match=r"image\.compression: compression 'lz4hc' is not"):
        load_spec(write("particle.toml", text))
    text = MINIMAL + '[image]\nfilesystem = "squashfs"\n'
    assert load_spec(write("particle.toml", text)).image.compression == "zstd"


def test_resolve_spec_path(write: Write, tmp_path: Path) -> None:
    write("particle.toml", MINIMAL)
    assert resolve_spec_path(None) == Path("particle.toml")
    assert resolve_spec_path(tmp_path) == tmp_path / "particle.toml"
    with pytest.raises(SpecError, match=r"^nope\.toml: no such spec file"):
        resolve_spec_path(Path("nope.toml"))


def test_resolved_version_and_digest(write: Write) -> None:
    spec = load_spec(write("particle.toml", MINIMAL))
    assert re.fullmatch(r"\d{14}", resolved_version(spec))
    pinned = load_spec(write("particle.toml", MINIMAL), overrides=["system.version=1.2"])
    assert resolved_version(pinned) == "1.2"
    assert re.fullmatch(r"[0-9a-f]{64}", spec_digest(spec))
    assert spec_digest(spec) == spec_digest(load_spec(Path("particle.toml")))
    assert spec_digest(spec) != spec_digest(pinned)


def test_json_schema_allows_include() -> None:
    schema = json_schema()
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert schema["properties"]["include"]["items"] == {"type": "string"}
    assert "system" in schema["properties"]
    json.dumps(schema)


def test_summary_text(write: Write) -> None:
    text = MINIMAL + '[image]\nusr_slot_size = "1536M"\n[users.admin]\ngroups = ["sudo"]\n'
    summary = summary_text(load_spec(write("particle.toml", text)))
    assert summary.splitlines()[0] == "demo auto (UTC timestamp at build time)"
    assert "/usr slot 1.5G, ESP 256M, root 512M" in summary
    assert "admin: uid auto, groups sudo" in summary
    assert "none (unsigned image)" in summary


@pytest.mark.parametrize(
    ("n", "text"), [(1 << 30, "1G"), (1536 << 20, "1.5G"), (64 << 10, "64K"), (100, "100 bytes")]
)
def test_format_size(n: int, text: str) -> None:
    assert format_size(n) == text


def test_key_path_and_value_rendering() -> None:
    assert key_path(["files", "/etc/motd", "mode"]) == 'files."/etc/motd".mode'
    assert key_path(["packages", "install", 3]) == "packages.install[3]"
    assert format_value("abc") == '"abc"'
    assert format_value(True) == "true"
    assert format_value({"a": [1, "b"]}) == '{ a = [1, "b"] }'
    assert format_value("x" * 100).endswith('xx...')
