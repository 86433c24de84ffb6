"""``make demo`` itself: ``examples/local_swarm.py --peers 3`` with the digits script, fast unthrottled peers.

The demo is what a newcomer runs first, and its peers are fast (thousands of samples/s each on a CPU): the case in
which the progress tracker used to reject honest peers as implausible, split the swarm (``peers 1``) and end with
three different models. This runs the real script, with its defaults, and checks what a user reads in its output.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: Lines that must never appear in a normal run's output (each was printed by demos before the fixes): tracebacks,
#: teardown noise, honest peers rejected as implausible, and a partial all-reduce (a follower that lost its leader's
#: BEGIN_ALLREDUCE produced them, see lightning_moshpit.p2p_streams).
FORBIDDEN = ("Traceback", "did not shut down", "Task was destroyed", "Ignored the progress record",
             "Reducer: received", "Averaging: received")  # fmt: skip
#: A demo runs about 150 averaging rounds (25 global steps, a gradient and a parameter round each, 3 peers). Issue 17
#: asks for at least 99% of rounds with every peer, so one failed round ("Averaging round failed", e.g. a peer that
#: lagged more than matchmaking_time on a loaded machine) is tolerated, and counted in the output; two fail the test.
MAX_FAILED_ROUNDS = 1


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_make_demo_trains_one_model_on_three_fast_peers_and_exits_cleanly() -> None:
    process = subprocess.run(
        [sys.executable, str(REPO / "examples" / "local_swarm.py"), "--peers", "3", "--timeout", "240"],
        capture_output=True, text=True, timeout=280, cwd=REPO,
    )  # fmt: skip
    output = process.stdout + process.stderr
    assert process.returncode == 0, output[-6000:]
    for forbidden in FORBIDDEN:
        lines = [line for line in output.splitlines() if forbidden in line]
        assert not lines, f"{forbidden!r} in the demo's output: {lines[:3]}\n{output[-4000:]}"
    failed_rounds = [line for line in output.splitlines() if "Averaging round failed" in line]
    print(f"failed averaging rounds: {len(failed_rounds)}")
    assert len(failed_rounds) <= MAX_FAILED_ROUNDS, failed_rounds
    progress = re.findall(r"\[peer (\d)\] step +\d+ \| loss [\d.]+ \| peers (\d+) \|", output)
    assert progress, output[-4000:]
    assert {peers for _, peers in progress} == {"3"}, f"a peer saw another swarm size: {progress}"
    finished = dict(re.findall(r"\[peer (\d)\] finished: .* swarm at global step (\d+)", output))
    assert finished == {"0": "25", "1": "25", "2": "25"}, finished  # the demo's --max-global-steps default
    # the launcher repeats each peer's summary line at the end; one model means one accuracy
    accuracies = dict(re.findall(r"\[peer (\d)\] held-out accuracy ([\d.]+)", output))
    assert len(accuracies) == 3, output[-4000:]
    rounds = [line for line in output.splitlines() if "final parameter round" in line or "Averaging" in line]
    assert len(set(accuracies.values())) == 1, f"the peers ended with different models: {accuracies}\n{rounds}"
    assert float(accuracies["0"]) > 0.85, accuracies  # 25 global steps of 256 digits: about 0.94 measured
