"""Images are built once per test session (and the bootstrap cache makes rebuilds cheap);
every integration test reuses them and checks many things per boot."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from particleos.builder import BuildResult, build
from particleos.spec import load_spec

SPECS = Path(__file__).resolve().parent / "specs"

BuildFn = Callable[..., BuildResult]


@pytest.fixture(scope="session")
def build_image(tmp_path_factory: pytest.TempPathFactory) -> BuildFn:
    """Build a spec once per (spec, version, overrides) in this session."""
    done: dict[tuple[str, str, tuple[str, ...]], BuildResult] = {}

    def _build(spec: str | Path, version: str, overrides: Sequence[str] = (),
               output: Path | None = None) -> BuildResult:
        path = Path(spec) if Path(spec).is_absolute() else SPECS / spec
        key = (str(path), version, tuple(overrides))
        if key not in done or output is not None:
            out = output or tmp_path_factory.mktemp(f"out-{path.name}-{version}")
            s = load_spec(path, overrides=[f"system.version={version}", *overrides])
            done[key] = build(s, out)
        return done[key]

    return _build
