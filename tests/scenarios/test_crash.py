"""Scenario 1: a peer is SIGKILLed mid-training; the survivors carry on without it."""

from __future__ import annotations

import signal

import pytest

from lightning_moshpit.testing import scenarios

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_survivors_finish_every_step_when_one_of_four_peers_is_killed(make_swarm, tmp_path, fault_free) -> None:
    swarm = make_swarm()
    progress = tmp_path / "progress"
    for index in range(4):
        extra = ["--progress-file", str(progress)] if index == 0 else []
        swarm.start_peer([*scenarios.PEER_ARGS, "--min-peers", "4", "--seed", str(index),
                          "--max-steps", str(scenarios.MAX_STEPS), *extra])  # fmt: skip
    killed_at = swarm.wait_for_global_step(progress, 3, timeout=120)
    swarm.signal_peer(3, signal.SIGKILL)
    codes = swarm.wait(200)
    assert codes[:3] == [0, 0, 0], [swarm.log(i)[-3000:] for i in range(3)]
    assert codes[3] == -signal.SIGKILL

    survivors = [scenarios.load_report(swarm.report_path(i)) for i in range(3)]
    result = scenarios.figures("crash (1 of 4 peers SIGKILLed)", survivors, fault_free)
    print(f"peer 3 killed at global step {killed_at}")
    assert result.steps_per_peer == [scenarios.MAX_STEPS] * 3
    assert result.longest_stall <= scenarios.AVERAGING_TIMEOUT + scenarios.MATCHMAKING_TIME
    for report in survivors:
        assert scenarios.final_loss(report) < scenarios.initial_loss(report)
        seen = report["num_peers"]
        assert 4 in seen, "the swarm never had 4 peers"
        assert 3 in seen[seen.index(4):], "the swarm size never dropped from 4 to 3 after the kill"
    step, difference = scenarios.max_param_difference(survivors)
    print(f"survivors' max |parameter difference| at global step {step}: {difference:.2e}")
    assert difference < 1e-4
