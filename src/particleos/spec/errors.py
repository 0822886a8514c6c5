"""Turning pydantic's validation errors into the plain `key.path: what is wrong (allowed)` text a
user can act on, without pydantic's vocabulary ("Input should be a valid dictionary...")."""

from __future__ import annotations

import datetime
import difflib
import json
import re
import types
from collections.abc import Sequence
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import ErrorDetails

from .model import FileEntry, Files, Spec

Key = str | int
KeyPath = tuple[Key, ...]

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_TYPE_NAMES = {
    "string_type": "a string",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "list_type": "a list",
    "dict_type": "a table",
    "model_type": "a table",
    "model_attributes_type": "a table",
}
_BOUNDS = {
    "greater_than_equal": ("ge", "at least"),
    "less_than_equal": ("le", "at most"),
    "greater_than": ("gt", "greater than"),
    "less_than": ("lt", "less than"),
}
# Keys the loader handles itself before validation, so they are allowed although not in Spec.
TOP_LEVEL_EXTRA = ("include",)


def key_path(path: Sequence[Key]) -> str:
    """Render a key path the way it is written in TOML: `files."/etc/motd".mode`, `a.b[3]`."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            text = part if _BARE_KEY.match(part) else json.dumps(part, ensure_ascii=False)
            out += f".{text}" if out else text
    return out


def format_value(value: Any, limit: int = 60) -> str:
    """A value as TOML would spell it (`42`, `"abc"`, `true`, `[1, 2]`), shortened if long."""
    text = _toml_value(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = ", ".join(f"{key_path([k])} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + items + " }" if items else "{}"
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    return repr(value)


def did_you_mean(key: str, allowed: Sequence[str]) -> str:
    """`unknown key 'pacakges' (did you mean 'packages'?)`, or the allowed keys if none is close."""
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    if close:
        return f"unknown key {key!r} (did you mean {close[0]!r}?)"
    return f"unknown key {key!r} (allowed: {', '.join(allowed)})"


def allowed_keys(path: Sequence[Key]) -> list[str]:
    """The keys the table at `path` accepts, found by walking the models (empty if unknown)."""
    model = _model_at(path)
    if model is None:
        return []
    keys = list(model.model_fields)
    return keys + list(TOP_LEVEL_EXTRA) if model is Spec else keys


def _unwrap(tp: Any) -> Any:
    """Strip Annotated[...] and `X | None` down to the type that holds the keys."""
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            tp = get_args(tp)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp
            tp = args[0]
        else:
            return tp


def _model_at(path: Sequence[Key]) -> type[BaseModel] | None:
    tp: Any = Spec
    for part in path:
        tp = _unwrap(tp)
        origin = get_origin(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            if isinstance(part, str) and part in tp.model_fields:
                tp = tp.model_fields[part].annotation
            elif tp is Files:
                tp = FileEntry
            else:
                return None
        elif origin is dict:
            tp = get_args(tp)[1]
        elif origin is list:
            tp = get_args(tp)[0]
        else:
            return None
    tp = _unwrap(tp)
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def clean_loc(loc: Sequence[Key]) -> KeyPath:
    """Pydantic marks errors in a dict key with a trailing '[key]'; the key itself is the path."""
    return tuple(part for part in loc if part != "[key]")


def message(err: ErrorDetails) -> str:
    """One pydantic error as plain text: what is wrong, and what is allowed."""
    kind = err["type"]
    value = err.get("input")
    ctx: dict[str, Any] = dict(err.get("ctx") or {})
    if kind in _TYPE_NAMES:
        return f"expected {_TYPE_NAMES[kind]}, got {format_value(value)}"
    if kind == "missing":
        return "missing required key"
    if kind == "extra_forbidden":
        loc = clean_loc(err["loc"])
        return did_you_mean(str(loc[-1]), allowed_keys(loc[:-1]))
    if kind == "literal_error":
        allowed = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        return f"bad value {value!r} (allowed: {', '.join(allowed)})"
    if kind in ("value_error", "assertion_error"):
        error = ctx.get("error")
        text = str(error) if error is not None else err["msg"]
        return re.sub(r"^(Value|Assertion) error, ", "", text)
    if kind in _BOUNDS:
        name, words = _BOUNDS[kind]
        return f"bad value {format_value(value)} (must be {words} {ctx.get(name)})"
    return f"{err['msg']} (got {format_value(value)})"
