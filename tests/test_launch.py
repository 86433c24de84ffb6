"""The test launcher's forked peers must be as independent as peers started with ``python -m``."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from lightning_moshpit.testing.launch import start_module


def wait_for_file(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} did not appear within {timeout} s"
        time.sleep(0.05)


@pytest.mark.timeout(120)
def test_a_forked_peer_killed_while_holding_a_hivemind_lock_does_not_freeze_the_next_one(tmp_path: Path) -> None:
    # Regression: forked peers shared the forkserver's hivemind locks, so one SIGKILL at the wrong moment froze every
    # peer started afterwards (14 multi-peer tests failed in one CI run, each "bootstrap peer wrote no address").
    env = dict(os.environ)
    holder = start_module("hivemind_lock_probe", ["hold", str(tmp_path / "held")], env, tmp_path / "hold.log", True)
    user = None
    try:
        wait_for_file(tmp_path / "held", 60)
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=10)
        user = start_module("hivemind_lock_probe", ["use", str(tmp_path / "used")], env, tmp_path / "use.log", True)
        try:
            code = user.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("a peer forked after the kill is stuck on the killed peer's hivemind lock")
        assert code == 0, (tmp_path / "use.log").read_text()[-2000:]
        assert (tmp_path / "used").read_text() == "used"
    finally:
        for process in (holder, user):
            if process is not None and process.poll() is None:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
