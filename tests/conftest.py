"""Shared fixtures: a unique run id per test, and a check that no p2pd daemon outlives a test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from cli_helpers import check_no_leftover_p2pd


@pytest.fixture(autouse=True)
def no_leftover_p2pd() -> Iterator[None]:
    """Fail the test if it leaves one of this run's p2pd daemons behind (after a grace period for orderly shutdown).

    Only this test run's daemons count: other runs (another engineer's tests, CI, a ``lightning-moshpit local`` demo)
    may share the machine, and killing their daemons would break them.
    """
    yield from check_no_leftover_p2pd()


@pytest.fixture
def run_id() -> str:
    """A swarm namespace no other test shares."""
    return f"test_{uuid.uuid4().hex[:12]}"
