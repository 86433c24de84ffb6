"""Scenario 5: a peer whose gradients turn NaN does not corrupt the swarm."""

from __future__ import annotations

import pytest

from lightning_moshpit.testing import scenarios

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

NAN_BATCHES = [10, 11, 12, 40]


def test_nan_gradients_are_dropped_with_a_warning_and_parameters_stay_finite(make_swarm, fault_free) -> None:
    swarm = make_swarm()
    for index in range(3):
        extra = ["--nan-batches", ",".join(map(str, NAN_BATCHES))] if index == 1 else []
        swarm.start_peer([*scenarios.PEER_ARGS, "--min-peers", "3", "--seed", str(index),
                          "--max-steps", str(scenarios.MAX_STEPS), *extra])  # fmt: skip
    codes = swarm.wait(200)
    assert codes == [0, 0, 0], [swarm.log(i)[-3000:] for i in range(3)]
    reports = [scenarios.load_report(swarm.report_path(i)) for i in range(3)]
    scenarios.figures(f"non-finite (1 of 3 peers has NaN gradients in batches {NAN_BATCHES})", reports, fault_free)

    assert all(scenarios.all_finite(report) for report in reports)
    assert reports[1]["dropped_batches"] == len(NAN_BATCHES)
    assert reports[0]["dropped_batches"] == reports[2]["dropped_batches"] == 0
    log = swarm.log(1)
    assert "Dropped a batch at global step" in log and "NaN gradient" in log, log[-3000:]
    step, difference = scenarios.max_param_difference(reports)
    print(f"max |parameter difference| at global step {step}: {difference:.2e}")
    assert difference < 1e-4
    for report in reports:
        assert scenarios.final_loss(report) < scenarios.initial_loss(report)
