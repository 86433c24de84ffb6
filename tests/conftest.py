"""Shared fixtures: a unique run id per test, and a check that no p2pd daemon outlives a test."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator

import pytest


def p2pd_pids() -> set[int]:
    """PIDs of running hivemind p2pd daemons (hivemind ships the binary as hivemind_cli/p2pd)."""
    result = subprocess.run(["pgrep", "-f", "hivemind_cli/p2pd"], capture_output=True, text=True)
    return {int(pid) for pid in result.stdout.split()}


@pytest.fixture(autouse=True)
def no_leftover_p2pd() -> Iterator[None]:
    """Fail the test if it leaves a p2pd daemon behind (after a grace period for orderly shutdown)."""
    before = p2pd_pids()
    yield
    deadline = time.monotonic() + 15
    leftover = p2pd_pids() - before
    while leftover and time.monotonic() < deadline:
        time.sleep(0.25)
        leftover = p2pd_pids() - before
    for pid in leftover:  # clean up so one leak does not cascade into other tests
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not leftover, f"p2pd daemons left running after the test: {sorted(leftover)}"


@pytest.fixture
def run_id() -> str:
    """A swarm namespace no other test shares."""
    return f"test_{uuid.uuid4().hex[:12]}"
