"""Shared test configuration: slow tests (real mirror, real QEMU) are marked `slow`; the order
of the test files for the two pytest-xdist workers (`addopts` in pyproject.toml): the longest
chains of boots start first, one on each worker, and the short files fill in behind them, so
the suite takes about as long as its longest worker rather than the sum of all."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO

# Test files by how long they take under TCG on 2 cores (minutes, measured), longest first.
# A file not listed runs after these, in collection order.
LONGEST_FIRST = (
    "integration/test_updates.py",  # ~15
    "integration/test_fallback.py",  # ~14
    "integration/test_extensions.py",  # ~5
    "integration/test_encrypted.py",  # ~5
    "integration/test_machine_life.py",  # ~4.5
    "integration/test_boot.py",  # ~4.5
    "integration/test_oci_update.py",  # ~4
    "integration/test_trust.py",  # ~2.5
    "integration/test_layers.py",  # ~1.5
)


def _rank(item: pytest.Item) -> int:
    path = item.nodeid.split("::", 1)[0]
    for i, name in enumerate(LONGEST_FIRST):
        if path.endswith(name):
            return i
    return len(LONGEST_FIRST)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=_rank)  # stable: the order within a file is kept (chained tests)
