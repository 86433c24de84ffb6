"""Scenario 3: a peer is SIGSTOPped for longer than averaging_timeout, then resumed."""

from __future__ import annotations

import signal
import time

import pytest

from lightning_moshpit.testing import scenarios

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_paused_peer_resynchronises_instead_of_sending_stale_gradients(make_swarm, tmp_path, fault_free) -> None:
    swarm = make_swarm()
    progress = tmp_path / "progress"
    for index in range(3):
        extra = ["--progress-file", str(progress)] if index == 0 else []
        swarm.start_peer([*scenarios.PEER_ARGS, "--min-peers", "3", "--seed", str(index),
                          "--max-steps", str(scenarios.MAX_STEPS + 60), *extra])  # fmt: skip
    paused_at = swarm.wait_for_global_step(progress, 3, timeout=120)
    swarm.signal_peer(2, signal.SIGSTOP)  # the whole process group: a closed laptop lid stops p2pd as well
    pause = scenarios.AVERAGING_TIMEOUT + 10
    time.sleep(pause)
    during_pause = int(progress.read_text())
    resumed = time.time()
    swarm.signal_peer(2, signal.SIGCONT)
    codes = swarm.wait(240)
    assert codes == [0, 0, 0], [swarm.log(i)[-3000:] for i in range(3)]
    reports = [scenarios.load_report(swarm.report_path(i)) for i in range(3)]
    scenarios.figures(f"pause (1 of 3 peers SIGSTOPped for {pause:.0f} s)", reports, fault_free)
    print(f"paused at global step {paused_at}; the others reached {during_pause} while it was stopped")
    assert during_pause >= paused_at + 2, "the other peers must keep stepping while one is stopped"

    paused = reports[2]
    log = swarm.log(2)
    print(f"paused peer: {paused['resyncs']} resynchronisation(s)")
    assert paused["resyncs"] >= 1 and "loading the swarm's state" in log, log[-3000:]
    # no gradient round of the paused peer succeeded for a step the swarm had already left
    stale = [r for r in paused["rounds"] if r["time"] > resumed and r["epoch"] < during_pause and r["succeeded"]]
    assert not stale, stale
    # it came back with the swarm's parameters: its first global step after the pause holds the swarm's values
    back_at = min(int(step) for step in paused["snapshots"] if int(step) > paused_at)
    reference = reports[0] if str(back_at) in reports[0]["snapshots"] else reports[1]
    difference = max(abs(a - b) for a, b in zip(paused["snapshots"][str(back_at)], reference["snapshots"][str(back_at)]))
    print(f"back at global step {back_at}: max |parameter difference| to the swarm {difference:.2e}")
    assert back_at >= during_pause - 1 and difference < 1e-4
    step, later = scenarios.max_param_difference(reports)
    print(f"max |parameter difference| at the last common global step {step}: {later:.2e} (reported, see "
          f"docs/fault_tolerance.md, 'Known limitations')")  # fmt: skip
