"""Shared fixtures: a unique run id per test, and a check that no p2pd daemon outlives a test."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

#: Every process this test run starts inherits this variable (set before any of them exists), and so do the p2pd
#: daemons hivemind launches (it copies ``os.environ``). A daemon carrying our value is ours even after its parent
#: died and it was re-parented to init, which is exactly the leak the check must see; another test run's daemons,
#: or an engineer's swarm on the same machine, carry another value (or none) and are left alone.
SESSION_MARKER = "LIGHTNING_MOSHPIT_TEST_SESSION"
os.environ[SESSION_MARKER] = uuid.uuid4().hex
_MARKER_ENTRY = f"{SESSION_MARKER}={os.environ[SESSION_MARKER]}".encode()


def own_p2pd_pids() -> set[int]:
    """PIDs of running hivemind p2pd daemons (``hivemind_cli/p2pd``) started by this test run, and no one else's."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if b"hivemind_cli/p2pd" not in (entry / "cmdline").read_bytes():
                continue
            if _MARKER_ENTRY in (entry / "environ").read_bytes().split(b"\0"):
                pids.add(int(entry.name))
        except OSError:  # exited meanwhile, or not ours to read
            continue
    return pids


@pytest.fixture(autouse=True)
def no_leftover_p2pd() -> Iterator[None]:
    """Fail the test if it leaves one of its p2pd daemons behind (after a grace period for orderly shutdown)."""
    before = own_p2pd_pids()
    yield
    deadline = time.monotonic() + 15
    leftover = own_p2pd_pids() - before
    while leftover and time.monotonic() < deadline:
        time.sleep(0.25)
        leftover = own_p2pd_pids() - before
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
