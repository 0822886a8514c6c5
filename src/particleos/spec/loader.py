"""Loading `particle.toml`: includes, profiles and `--set` overrides are merged into one tree
while remembering which file set each key, so every validation problem can be reported as
`FILE: key.path: message` pointing at the line the user has to change."""

from __future__ import annotations

import copy
import difflib
import os
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from ..errors import SpecError
from .checks import check_inputs
from .errors import Key, KeyPath, clean_loc, did_you_mean, format_value, key_path, message
from .model import Spec

SPEC_NAME = "particle.toml"
_PROFILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_TOML_POS = re.compile(r"^(?P<msg>.*) \(at line (?P<line>\d+), column (?P<col>\d+)\)$", re.DOTALL)


@dataclass(frozen=True)
class Origin:
    """Where a merged key came from: the file (or `--set KEY`) and its key path in that file."""

    label: str
    path: KeyPath


@dataclass
class Layer:
    """One file's data (includes removed, relative paths made absolute), applied in order."""

    label: str
    data: dict[str, Any]


@dataclass
class Merged:
    """The merged tree and the origin of every table, list element and leaf in it."""

    data: dict[str, Any] = field(default_factory=dict)
    origins: dict[KeyPath, Origin] = field(default_factory=dict)

    def origin(self, loc: KeyPath, default: str) -> tuple[str, KeyPath]:
        """The file that last set `loc` (or its nearest parent) and `loc` as spelled there."""
        for n in range(len(loc), 0, -1):
            found = self.origins.get(loc[:n])
            if found is not None:
                return found.label, found.path + loc[n:]
        return default, loc


def display_path(path: str | Path) -> str:
    """A path relative to the working directory when it is below it, else absolute."""
    absolute = os.path.abspath(path)
    try:
        return str(Path(absolute).relative_to(Path.cwd()))
    except ValueError:
        return absolute


def resolve_spec_path(path: Path | None) -> Path:
    """Find the spec: no argument means ./particle.toml, a directory means DIR/particle.toml."""
    if path is None:
        path = Path(SPEC_NAME)
    elif path.is_dir():
        path = path / SPEC_NAME
    if not path.is_file():
        raise SpecError(
            [f"{path}: no such spec file (give a particle.toml or the directory holding it)"]
        )
    return path


def load_spec(path: Path, profiles: Sequence[str] = (), overrides: Sequence[str] = ()) -> Spec:
    """Load, merge and validate a spec; raises SpecError listing every problem found."""
    path = resolve_spec_path(path)
    top = display_path(path)
    problems: list[str] = []
    layers: list[Layer] = []
    _collect(Path(os.path.abspath(path)), [], problems, layers)
    for name in profiles:
        profile = _profile_path(path, name, top, problems)
        if profile is not None:
            _collect(profile, [], problems, layers)
    parsed = [_parse_override(text, problems) for text in overrides]
    if problems:
        raise SpecError(problems)

    merged = Merged()
    for layer in layers:
        _merge(merged, layer.data, layer.label, ())
    for item in parsed:
        if item is not None:
            _set(merged, *item)
    spec = _validate(merged, top)
    spec.set_origins(lambda loc: merged.origin(loc, top))
    problems_found = check_inputs(spec)
    if problems_found:
        raise SpecError([p.line(spec.origin) for p in problems_found],
                        hints=[p.hint for p in problems_found if p.hint])
    return spec


# --- reading files and includes ---------------------------------------------------------------


def _read(path: Path, label: str, problems: list[str]) -> dict[str, Any] | None:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as err:
        m = _TOML_POS.match(str(err))
        if m:
            problems.append(f"{label}: line {m['line']}, column {m['col']}: {m['msg']}")
        else:
            text = str(err).removesuffix(" (at end of document)")
            opened = _unclosed(path.read_text(errors="replace")) if text != str(err) else None
            if opened is not None:
                line, col, what = opened
                problems.append(
                    f"{label}: line {line}, column {col}: {what} opened here is never closed "
                    f"({text} at end of file)"
                )
            else:
                where = "end of file: " if text != str(err) else ""
                problems.append(f"{label}: {where}{text}")
    except UnicodeDecodeError:
        problems.append(f"{label}: not UTF-8 text (TOML files must be UTF-8)")
    except OSError as err:
        problems.append(f"{label}: cannot read: {err.strerror or err}")
    return None


def _unclosed(text: str) -> tuple[int, int, str] | None:
    """Where the outermost construct still open at the end of `text` began: (line, column,
    what), or None. tomllib only says "at end of document", which points nowhere useful."""
    stack: list[tuple[int, int, str]] = []  # brackets and braces: (line, column, closer)
    line, col, i, n = 1, 1, 0, len(text)
    names = {"]": "the array", "}": "the inline table"}
    string: tuple[int, int, str] | None = None  # an open string: (line, column, delimiter)
    in_value = False  # after "=" or inside brackets: "[" is an array, not a table header
    while i < n:
        c = text[i]
        step = 1
        if string is not None:
            delim = string[2]
            if text.startswith(delim, i):
                string, step = None, len(delim)
            elif c == "\\" and delim in ('"', '"""'):
                step = 2
            elif c == "\n" and len(delim) == 1:
                string = None  # tomllib reports a newline in a string with its position
        elif c == "#":
            while i + step < n and text[i + step] != "\n":
                step += 1
        elif c in "\"'":
            delim = c * 3 if text.startswith(c * 3, i) else c
            string, step = (line, col, delim), len(delim)
        elif c in "[{":
            if c == "{" or in_value or stack:
                stack.append((line, col, "]" if c == "[" else "}"))
        elif c in "]}":
            if stack and stack[-1][2] == c:
                stack.pop()
        elif c == "=":
            in_value = True
        elif c == "\n" and not stack:
            in_value = False
        for ch in text[i : i + step]:
            line, col = (line + 1, 1) if ch == "\n" else (line, col + 1)
        i += step
    if string is not None:
        kind = "the multi-line string" if len(string[2]) == 3 else "the string"
        return string[0], string[1], kind
    if stack:
        return stack[0][0], stack[0][1], names[stack[0][2]]
    return None


def _collect(
    path: Path, chain: list[Path], problems: list[str], layers: list[Layer]
) -> None:
    """Append `path`'s included files (depth first, in order), then `path` itself, to layers."""
    label = display_path(path)
    chain = [*chain, Path(os.path.realpath(path))]
    data = _read(path, label, problems)
    if data is None:
        return
    includes = data.pop("include", [])
    if not isinstance(includes, list):
        problems.append(f"{label}: include: expected a list, got {format_value(includes)}")
        includes = []
    for i, item in enumerate(includes):
        where = f"{label}: include[{i}]"
        if not isinstance(item, str):
            problems.append(f"{where}: expected a string, got {format_value(item)}")
            continue
        target = Path(os.path.abspath(path.parent / item))
        if Path(os.path.realpath(target)) in chain:
            names = " -> ".join(display_path(p) for p in [*chain, target])
            problems.append(f"{where}: include cycle: {names}")
        elif not target.is_file():
            problems.append(f"{where}: file not found: {item} (looked for {display_path(target)})")
        else:
            _collect(target, chain, problems, layers)
    _absolute_paths(data, path.parent)
    layers.append(Layer(label, data))


def _profile_path(spec: Path, name: str, top: str, problems: list[str]) -> Path | None:
    directory = Path(os.path.abspath(spec)).parent / "profiles"
    available = sorted(p.stem for p in directory.glob("*.toml")) if directory.is_dir() else []
    candidate = directory / f"{name}.toml"
    if _PROFILE_NAME.match(name) and candidate.is_file():
        return candidate
    choices = ", ".join(available) if available else f"none: {display_path(directory)} is empty"
    problems.append(f"{top}: --profile {name}: unknown profile (available: {choices})")
    return None


def _absolute_paths(data: dict[str, Any], base: Path) -> None:
    """Make the spec's file references absolute, relative to the file that declared them."""

    def fix(value: Any) -> Any:
        if not isinstance(value, str) or not value:
            return value
        absolute = os.path.normpath(os.path.join(base, value))
        return absolute + "/" if value.endswith("/") and absolute != "/" else absolute

    files = data.get("files")
    if isinstance(files, dict):
        for key, entry in files.items():
            if key == "trees" and isinstance(entry, list):
                files[key] = [fix(v) for v in entry]
            elif isinstance(entry, dict) and "source" in entry:
                entry["source"] = fix(entry["source"])
    signing = data.get("signing")
    if isinstance(signing, dict):
        for key in ("key", "certificate", "openpgp_key"):
            if key in signing:
                signing[key] = fix(signing[key])
        if isinstance(signing.get("update_keys"), list):
            signing["update_keys"] = [fix(v) for v in signing["update_keys"]]
    boot = data.get("boot")
    if isinstance(boot, dict) and "loader" in boot:
        boot["loader"] = fix(boot["loader"])
    update = data.get("update")
    source = update.get("source") if isinstance(update, dict) else None
    if isinstance(update, dict) and isinstance(source, str) and "://" not in source:
        update["source"] = fix(source)


# --- merging ----------------------------------------------------------------------------------


def _record(merged: Merged, path: KeyPath, value: Any, origin: Origin) -> None:
    """Note `origin` for `path` and everything below it (after dropping what was there)."""
    n = len(path)
    for stale in [p for p in merged.origins if p[:n] == path]:
        del merged.origins[stale]
    merged.origins[path] = origin
    children: list[tuple[Key, Any]] = []
    if isinstance(value, dict):
        children = list(value.items())
    elif isinstance(value, list):
        children = list(enumerate(value))
    for key, child in children:
        _record(merged, (*path, key), child, Origin(origin.label, (*origin.path, key)))


def _same(a: Any, b: Any) -> bool:
    """Equality that keeps `1` and `true` apart (Python thinks they are equal)."""
    return type(a) is type(b) and bool(a == b)


def _merge(merged: Merged, layer: dict[str, Any], label: str, path: KeyPath) -> None:
    """Tables merge key by key, lists append new elements, anything else is replaced.

    A list or table replacing something of another kind starts empty and is merged into, so a
    single file's list loses its duplicates too and each element keeps its index in that file.
    """
    target: dict[str, Any] = merged.data
    for part in path:
        target = target[str(part)]
    for key, value in layer.items():
        here = (*path, key)
        old = target.get(key)
        if not (
            (isinstance(old, dict) and isinstance(value, dict))
            or (isinstance(old, list) and isinstance(value, list))
        ):
            empty: Any = {} if isinstance(value, dict) else [] if isinstance(value, list) else None
            target[key] = copy.deepcopy(value) if empty is None else empty
            _record(merged, here, target[key], Origin(label, here))
        if isinstance(value, dict):
            _merge(merged, value, label, here)
        elif isinstance(value, list):
            items: list[Any] = target[key]
            for i, item in enumerate(value):
                if not any(_same(item, x) for x in items):
                    items.append(copy.deepcopy(item))
                    _record(merged, (*here, len(items) - 1), item, Origin(label, (*here, i)))
        merged.origins[here] = Origin(label, here)


# --- overrides --------------------------------------------------------------------------------


def _parse_override(text: str, problems: list[str]) -> tuple[tuple[str, ...], Any, str] | None:
    """`a.b=VALUE` -> (("a", "b"), value, "--set a.b"); VALUE is TOML if it parses, else text."""
    if "=" not in text:
        problems.append(f"--set {text}: expected KEY=VALUE, e.g. --set system.version=5")
        return None
    raw_key, _, raw = text.partition("=")
    raw_key, raw = raw_key.strip(), raw.strip()
    keys: list[str] = []
    try:
        node: Any = tomllib.loads(f"{raw_key} = 0")
        while isinstance(node, dict) and len(node) == 1:
            (key, node), = node.items()
            keys.append(key)
    except tomllib.TOMLDecodeError:
        node = None
    if node != 0 or not keys:
        problems.append(
            f"--set {text}: bad key {raw_key!r} (expected a dotted key such as system.version)"
        )
        return None
    if keys[0] == "include":
        problems.append(f"--set {text}: include cannot be overridden (use --profile instead)")
        return None
    value: Any = raw
    try:
        parsed = tomllib.loads(f"v = {raw}")
        # A scalar that would lose its spelling (1.10 -> 1.1, 1_0 -> 10, dates) stays text.
        if list(parsed) == ["v"] and (
            isinstance(parsed["v"], str | bool | list | dict)
            or (isinstance(parsed["v"], int) and str(parsed["v"]) == raw)
        ):
            value = parsed["v"]
    except tomllib.TOMLDecodeError:
        pass
    # Paths given on the command line are relative to where the command runs.
    nested = _wrap(keys, value)
    _absolute_paths(nested, Path.cwd())
    return tuple(keys), _unwrap(nested, keys), f"--set {raw_key}"


def _wrap(keys: list[str], value: Any) -> dict[str, Any]:
    out: Any = value
    for key in reversed(keys):
        out = {key: out}
    result: dict[str, Any] = out
    return result


def _unwrap(tree: dict[str, Any], keys: list[str]) -> Any:
    node: Any = tree
    for key in keys:
        node = node[key]
    return node


def _set(merged: Merged, keys: tuple[str, ...], value: Any, label: str) -> None:
    """An override replaces the value (lists too), creating tables on the way as needed."""
    target = merged.data
    for n, key in enumerate(keys[:-1]):
        if not isinstance(target.get(key), dict):
            target[key] = {}
            _record(merged, keys[: n + 1], {}, Origin(label, keys[: n + 1]))
        target = target[key]
    target[keys[-1]] = copy.deepcopy(value)
    _record(merged, keys, value, Origin(label, keys))


# --- validation -------------------------------------------------------------------------------


def _validate(merged: Merged, top: str) -> Spec:
    """Validate the merged tree; every problem becomes one `FILE: key.path: message` line."""
    data = copy.deepcopy(merged.data)
    problems: list[tuple[KeyPath, str]] = []
    # `[files]` keys are absolute paths or `trees`; checked here so that a typo gets a per-key
    # message and does not hide the other problems (the model's own check stops at the first).
    files = data.get("files")
    if isinstance(files, dict):
        for key in [k for k in files if k != "trees" and not k.startswith("/")]:
            problems.append((("files", key), _files_key_message(key)))
            del files[key]
    try:
        spec = Spec.model_validate(data)
    except ValidationError as err:
        problems += [(clean_loc(e["loc"]), message(e)) for e in err.errors()]
    else:
        if not problems:
            return spec
    # Sections that are valid on their own still get their file and cross-field checks.
    invalid = {str(loc[0]) for loc, _ in problems if loc}
    sections: dict[str, Any] = {}
    for name, info in Spec.model_fields.items():
        if name in data and name not in invalid:
            try:
                sections[name] = TypeAdapter(info.annotation or Any).validate_python(data[name])
            except ValidationError:
                invalid.add(name)
        elif info.is_required():
            invalid.add(name)
        else:
            sections[name] = info.get_default(call_default_factory=True)
    found = check_inputs(Spec.model_construct(**sections), invalid=invalid)
    extra = [(p.loc, p.text) for p in found]
    # Report in the order of the model (the `[files]` key check ran first); unknown keys last.
    order = list(Spec.model_fields)
    problems.sort(key=lambda p: order.index(p[0][0]) if p[0] and p[0][0] in order else len(order))
    problems += extra
    lines = []
    for loc, text in problems:
        label, where = (top, loc) if text == "missing required key" else merged.origin(loc, top)
        lines.append(f"{label}: {key_path(where)}: {text}" if where else f"{label}: {text}")
    raise SpecError(list(dict.fromkeys(lines)), hints=[p.hint for p in found if p.hint])


def _files_key_message(key: str) -> str:
    if difflib.get_close_matches(key, ["trees"], n=1, cutoff=0.6):
        return did_you_mean(key, ["trees"])
    return f"bad key {key!r} (allowed: 'trees' or an absolute path such as \"/etc/motd\")"
