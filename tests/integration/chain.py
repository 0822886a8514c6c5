"""Chained test modules: one machine (disk, UEFI variables) is driven through a sequence of
tests, each starting from the state the previous one left. After a failure the rest of the
chain is skipped: its machine is in an unknown state."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import pytest


class Chain(Protocol):
    failed: str | None  # the test that failed, once one has


def chain_step(chain: Chain, request: pytest.FixtureRequest) -> Iterator[None]:
    """The body of a chained module's autouse fixture (`yield from chain_step(m, request)`)."""
    if chain.failed:
        pytest.skip(f"the machine is in an unknown state since {chain.failed} failed")
    failed_before = request.session.testsfailed
    yield
    if request.session.testsfailed > failed_before:
        chain.failed = request.node.name
