"""Scenario 2: a peer that starts after the swarm made >= 5 global steps takes the swarm's state first."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_moshpit.testing import scenarios
from lightning_moshpit.testing.launch import LocalSwarm

pytestmark = [pytest.mark.slow, pytest.mark.timeout(560)]


def test_joiner_takes_step_parameters_and_optimizer_state_before_its_first_local_step(make_swarm, tmp_path) -> None:
    run_join_scenario(make_swarm(), tmp_path)


def run_join_scenario(swarm: LocalSwarm, workdir: Path) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    progress, stop = workdir / "progress", workdir / "stop"
    # the first two train until the joiner is done (``--stop-file``); 1000 local steps is only a safety cap
    common = [*scenarios.PEER_ARGS, "--batch-norm", "--max-steps", "1000", "--min-peers", "2", "--stop-file", str(stop)]
    swarm.start_peer([*common, "--seed", "0", "--progress-file", str(progress)])
    swarm.start_peer([*common, "--seed", "1"])
    swarm.wait_for_global_step(progress, 5, timeout=150)
    swarm.start_peer([*scenarios.PEER_ARGS, "--batch-norm", "--max-steps", "50", "--seed", "2"])
    swarm.processes[2].wait(timeout=180)
    stop.touch()
    codes = swarm.wait(60)
    assert codes == [0, 0, 0], [swarm.log(i)[-3000:] for i in range(3)]
    first, second, joiner = (scenarios.load_report(swarm.report_path(i)) for i in range(3))
    scenarios.figures("join (third peer after >= 5 global steps)", [first, second, joiner])

    joined_at = joiner["first_step_global"]
    print(f"joiner's first local step ran at global step {joined_at}")
    assert joined_at >= 5, "the joiner must start from the swarm's global step, not from 0"
    reference = first if str(joined_at) in first["snapshots"] else second
    params = max(abs(a - b) for a, b in zip(joiner["first_step_params"], reference["snapshots"][str(joined_at)]))
    momentum_ref = reference["optimizer_snapshots"][str(joined_at)]
    assert momentum_ref and len(joiner["first_step_optimizer_state"]) == len(momentum_ref)
    momentum = max(abs(a - b) for a, b in zip(joiner["first_step_optimizer_state"], momentum_ref))
    print(f"at its first step: max |difference| to the swarm's parameters {params:.2e}, momentum {momentum:.2e}")
    assert params < 1e-4 and momentum < 1e-4
    assert any(abs(v) > 1e-6 for v in momentum_ref), "the swarm's momentum should be non-zero by now"
    # BatchNorm running statistics came along: a fresh BatchNorm1d has running_mean 0 and running_var 1
    hidden = len(joiner["first_step_buffers"]) // 2
    assert any(abs(m) > 1e-3 for m in joiner["first_step_buffers"][:hidden])

    # one more averaging round later, the joiner's parameters equal the others'
    first_round = min(r["epoch"] for r in joiner["rounds"] if r["succeeded"])
    later = set.intersection(*(set(map(int, r["snapshots"])) for r in (first, second, joiner)))
    after = sorted(s for s in later if s > first_round)
    assert after, f"no global step after the joiner's first round ({first_round}) that all peers reached: {joiner['rounds']}"
    step, difference = scenarios.max_param_difference([first, second, joiner], after[0])
    print(f"after its first round (global step {first_round}): max |parameter difference| at step {step}: "
          f"{difference:.2e}")  # fmt: skip
    assert difference <= 1e-6, f"the joiner drifted: max |parameter difference| {difference:.2e} at global step {step}"
