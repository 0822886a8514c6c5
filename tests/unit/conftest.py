"""Unit-test helpers shared by several modules."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest

from particleos.cli import main


class Result(NamedTuple):
    """One `particle` run: exit status, stdout, stderr (unpacks like a tuple, too)."""

    code: int
    out: str
    err: str


Run = Callable[..., Result]


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Run:
    """Call the console entry point in-process (fast), with tmp_path as working directory;
    never a traceback."""
    monkeypatch.chdir(tmp_path)

    def _run(*args: str) -> Result:
        monkeypatch.setattr(sys, "argv", ["particle", *args])
        code = 0
        try:
            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        captured = capsys.readouterr()
        assert "Traceback" not in captured.out + captured.err
        return Result(code, captured.out, captured.err)

    return _run
