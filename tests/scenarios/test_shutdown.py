"""Scenario 7: clean shutdown. Ctrl-C (SIGINT to the peer's process group) during fit leaves nothing behind.

Every other scenario checks the same thing after it ends: the ``make_swarm`` fixture fails a test if any process of a
peer's session (its averagers, DHT process, p2pd) is still running, and ``tests/conftest.py`` checks for p2pd.
"""

from __future__ import annotations

import signal
import time

import pytest

from lightning_moshpit.testing import scenarios

pytestmark = [pytest.mark.slow, pytest.mark.timeout(200)]


def test_ctrl_c_in_fit_shuts_the_peer_down_cleanly_and_the_swarm_goes_on(make_swarm, tmp_path) -> None:
    swarm = make_swarm()
    progress = tmp_path / "progress"
    swarm.start_peer([*scenarios.PEER_ARGS, "--min-peers", "2", "--max-steps", "130", "--progress-file", str(progress)])
    swarm.start_peer([*scenarios.PEER_ARGS, "--min-peers", "2", "--max-steps", "130", "--seed", "1"])
    swarm.wait_for_global_step(progress, 2, timeout=120)
    interrupted = time.monotonic()
    swarm.signal_peer(1, signal.SIGINT)  # what a terminal sends on Ctrl-C: the whole foreground process group
    code = swarm.processes[1].wait(timeout=60)
    took = time.monotonic() - interrupted
    log = swarm.log(1)
    print(f"interrupted peer exited with code {code} after {took:.1f} s")
    assert "KeyboardInterrupt" in log, log[-3000:]
    # Lightning's fit turns the KeyboardInterrupt into a graceful shutdown (on_exception hooks, then the strategy's
    # teardown, which closes the optimizer's averagers and the DHT) and ends with sys.exit(1), whether the peer is a
    # forked process or `python -m`. So 1 and only 1 says that path ran to its end: 0 would mean Ctrl-C was swallowed
    # and training finished; -SIGINT that the interrupt escaped Lightning's handler (no teardown); -SIGKILL that the
    # peer hung and was killed; another code that the shutdown itself raised.
    assert code == 1, f"exit code {code}; log:\n{log[-3000:]}"
    deadline = time.monotonic() + 15
    while swarm.leftover_processes([1]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not swarm.leftover_processes([1]), swarm.leftover_processes([1])
    assert swarm.wait(150)[0] == 0, swarm.log(0)[-3000:]
    survivor = scenarios.load_report(swarm.report_path(0))
    scenarios.figures("Ctrl-C (1 of 2 peers interrupted)", [survivor])
    assert survivor["local_steps"] == 130
