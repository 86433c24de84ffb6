"""Scenario 3: a peer is SIGSTOPped for longer than averaging_timeout, then resumed."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from lightning_moshpit.testing import scenarios
from lightning_moshpit.testing.launch import LocalSwarm

pytestmark = [pytest.mark.slow, pytest.mark.timeout(560)]

#: The swarm's global step at which every peer stops (MoshpitStrategy(max_global_steps=END)), about 6 steps after the
#: paused peer is back (the others reach about 9 during the pause).
END = 16


def test_paused_peer_resynchronises_instead_of_sending_stale_gradients(make_swarm, tmp_path, fault_free) -> None:
    run_pause_scenario(make_swarm(), tmp_path, fault_free)


def run_pause_scenario(swarm: LocalSwarm, workdir: Path, fault_free: list[dict]) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    progress = workdir / "progress"
    own_progress = workdir / "paused_progress"  # the paused peer's own global step (it may be one ahead of peer 0)
    for index in range(3):
        extra = {0: ["--progress-file", str(progress)], 2: ["--progress-file", str(own_progress)]}.get(index, [])
        swarm.start_peer([*scenarios.PEER_ARGS, "--min-peers", "3", "--seed", str(index), "--max-steps", "100000",
                          "--end-at-global-step", str(END), *extra])  # fmt: skip
    paused_at = swarm.wait_for_global_step(progress, 3, timeout=120)
    swarm.signal_peer(2, signal.SIGSTOP)  # the whole process group: a closed laptop lid stops p2pd as well
    time.sleep(0.5)
    stopped_at = int(own_progress.read_text())  # the last global step the paused peer reached before it stopped
    pause = scenarios.AVERAGING_TIMEOUT + 10
    time.sleep(pause)
    during_pause = int(progress.read_text())
    resumed = time.time()
    swarm.signal_peer(2, signal.SIGCONT)
    codes = swarm.wait(240)
    assert codes == [0, 0, 0], [swarm.log(i)[-3000:] for i in range(3)]
    reports = [scenarios.load_report(swarm.report_path(i)) for i in range(3)]
    scenarios.figures(f"pause (1 of 3 peers SIGSTOPped for {pause:.0f} s)", reports, fault_free)
    print(f"paused at global step {paused_at} (its own: {stopped_at}); the others reached {during_pause} while it was "
          f"stopped")  # fmt: skip
    assert during_pause >= paused_at + 2, "the other peers must keep stepping while one is stopped"

    paused = reports[2]
    log = swarm.log(2)
    print(f"paused peer: {paused['resyncs']} resynchronisation(s)")
    assert paused["resyncs"] >= 1 and "loading the swarm's state" in log, log[-3000:]
    # no gradient round of the paused peer succeeded for a step the swarm had already left
    stale = [r for r in paused["rounds"] if r["time"] > resumed and r["epoch"] < during_pause and r["succeeded"]]
    assert not stale, stale
    # After SIGCONT its first batch may still see the step it had when stopped (the snapshot is taken before the step
    # that notices the stale view); from then on it must jump to the swarm's step, never walk through the ones missed
    after = sorted(int(step) for step in paused["snapshots"] if int(step) > stopped_at)
    walked = [step for step in after if stopped_at + 1 < step < during_pause - 1]
    assert not walked, f"the paused peer trained at global steps the swarm had left: {walked} (swarm: {during_pause})"
    back_at = min(step for step in after if step >= during_pause - 1)
    reference = reports[0] if str(back_at) in reports[0]["snapshots"] else reports[1]
    difference = max(abs(a - b) for a, b in zip(paused["snapshots"][str(back_at)], reference["snapshots"][str(back_at)]))
    print(f"back at global step {back_at} (steps it saw after the pause: {after[:4]}...): max |parameter difference| "
          f"to the swarm {difference:.2e}")  # fmt: skip
    assert difference < 1e-4, f"the resumed peer drifted: max |parameter difference| {difference:.2e} at {back_at}"
    # after its next successful round, the resumed peer holds the swarm's exact parameters
    first_round = min(r["epoch"] for r in paused["rounds"] if r["time"] > resumed and r["succeeded"])
    step, after_round = scenarios.max_param_difference(reports, first_round + 1)
    print(f"after its first round back (global step {first_round}): max |parameter difference| at step {step}: "
          f"{after_round:.2e}")  # fmt: skip
    assert after_round <= 1e-6, f"the resumed peer drifted: {after_round:.2e} at global step {step}"
    # and the run ends with one model (MoshpitStrategy(max_global_steps=END))
    assert [report["global_step"] for report in reports] == [END] * 3
    final_gap = max(abs(a - b) for report in reports[1:] for a, b in zip(reports[0]["final_params"], report["final_params"]))
    print(f"final parameters: max |difference| {final_gap:.2e}")
    assert final_gap <= 1e-6
