"""Version ordering exactly as systemd compares versions (strverscmp_improved): what decides
which version sysupdate calls newest and which UKI systemd-boot boots by default. Standard
library only, shared by the machine side and `particle publish`."""

from __future__ import annotations

import functools

_SEPARATORS = "~-^."


def _valid(c: str) -> bool:
    return (c.isascii() and c.isalnum()) or c in _SEPARATORS


def vercmp(a: str, b: str) -> int:
    """-1, 0 or 1 as a is older than, equal to or newer than b ('~' marks pre-releases,
    '-' a release suffix, '^' a patch level; digits compare as numbers)."""
    if not a or not b:
        return (a > b) - (a < b)
    i = j = 0
    while True:
        while i < len(a) and not _valid(a[i]):
            i += 1
        while j < len(b) and not _valid(b[j]):
            j += 1
        ca, cb = a[i : i + 1], b[j : j + 1]
        if ca == "~" or cb == "~":
            if (ca != "~") != (cb != "~"):
                return 1 if ca != "~" else -1
            i, j = i + 1, j + 1
            ca, cb = a[i : i + 1], b[j : j + 1]
        if not ca or not cb:
            return (ca > cb) - (ca < cb)
        for sep in "-^.":
            if ca == sep or cb == sep:
                if (ca != sep) != (cb != sep):
                    return 1 if ca != sep else -1
                i, j = i + 1, j + 1
                ca, cb = a[i : i + 1], b[j : j + 1]
        if ca.isdigit() or cb.isdigit():
            ei, ej = _span(a, i, str.isdigit), _span(b, j, str.isdigit)
            if (ei != i) != (ej != j):
                return 1 if ei != i else -1
            na, nb = a[i:ei].lstrip("0"), b[j:ej].lstrip("0")
            if len(na) != len(nb):
                return 1 if len(na) > len(nb) else -1
            if na != nb:
                return 1 if na > nb else -1
        else:
            ei, ej = _span(a, i, str.isalpha), _span(b, j, str.isalpha)
            sa, sb = a[i:ei], b[j:ej]
            n = min(len(sa), len(sb))
            if sa[:n] != sb[:n]:
                return 1 if sa[:n] > sb[:n] else -1
            if len(sa) != len(sb):
                return 1 if len(sa) > len(sb) else -1
        i, j = ei, ej


def _span(s: str, start: int, pred: object) -> int:
    end = start
    while end < len(s) and s[end].isascii() and pred(s[end]):  # type: ignore[operator]
        end += 1
    return end


version_key = functools.cmp_to_key(vercmp)
