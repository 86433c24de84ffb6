"""Scenario 8: one Byzantine peer of four sends its gradients times -1000; CenteredClip keeps the swarm training.

The test runs three swarms of four peers with the same settings and seeds, and compares the honest peers' held-out
accuracy when the swarm reaches the same global step:

- **clean**: four honest peers with CenteredClip: how far the task gets in that many global steps;
- **attacked, CenteredClip**: peer 3 sign-flips its gradients (x -1000);
- **attacked, mean** (the control): the same attack against hivemind's plain mean, which it wrecks (the mean moves by
  1000/4 gradients the wrong way: parameters blow up or turn NaN within a global step or two).

See benchmarks/attacks.py and docs/security.md for every attack over 25 global steps and 3 seeds.
"""

from __future__ import annotations

import time
from typing import Callable

import pytest

from lightning_moshpit.testing import scenarios
from lightning_moshpit.testing.launch import LocalSwarm

pytestmark = [pytest.mark.slow, pytest.mark.timeout(480)]

PEERS = 4
ATTACKER = 3  # not the bootstrap peer, so the honest peers' swarm does not depend on it
#: every peer stops when the swarm reaches it (the clean run's accuracy: ~0.53 at step 12, ~0.78 at step 20)
GLOBAL_STEPS = 20
#: benchmarks/attacks.py's settings: an MLP 64-64-10 on scikit-learn's digits (bundled), SGD lr 0.2 with momentum,
#: 512 samples per global step. The local-step cap only ends the mean control, whose swarm stops advancing once its
#: parameters are NaN (at global step 10-12); honest CenteredClip peers took 78-185 local steps to reach step 20.
SETTINGS = ["--task", "digits", "--hidden", "64", "--lr", "0.2", "--batch-size", "32", "--min-peers", str(PEERS),
            "--matchmaking-time", "1.0", "--averaging-timeout", "10", "--max-global-steps", str(GLOBAL_STEPS),
            "--max-steps", str(20 * GLOBAL_STEPS)]  # fmt: skip


def run_swarm(make_swarm: Callable[..., LocalSwarm], name: str, aggregation: str, attack: bool) -> list[dict]:
    """One swarm of ``PEERS`` peers (peer ``ATTACKER`` sign-flipping if ``attack``); the honest peers' reports."""
    swarm = make_swarm(name)
    started = time.monotonic()
    for index in range(PEERS):
        byzantine = ["--attack", "sign_flip", "--attack-scale", "1000"] if attack and index == ATTACKER else []
        swarm.start_peer([*SETTINGS, "--seed", str(index), "--aggregation", aggregation, *byzantine])
    codes = swarm.wait(150)
    honest = [i for i in range(PEERS) if not (attack and i == ATTACKER)]
    assert [codes[i] for i in honest] == [0] * len(honest), [swarm.log(i)[-3000:] for i in honest]
    reports = [scenarios.load_report(swarm.report_path(i)) for i in honest]
    scenarios.figures(f"byzantine: {name}", reports)
    accuracies = [round(report["test_accuracy"], 3) for report in reports]
    losses = [round(report["test_loss"], 3) for report in reports]
    print(
        f"  {name}: {time.monotonic() - started:.0f} s; global steps {[r['global_step'] for r in reports]}; "
        f"resyncs {[r['resyncs'] for r in reports]}; honest test accuracy {accuracies}; test loss {losses}"
    )
    if attack and aggregation == "centered_clip":
        # the attack went through the real averaging, and the honest reducers saw it and clipped it
        logs = [swarm.log(i) for i in honest]
        assert any("CenteredClip: peer" in log for log in logs), logs[0][-3000:]
    return reports


def mean_accuracy(reports: list[dict]) -> float:
    return sum(report["test_accuracy"] for report in reports) / len(reports)


def test_centered_clip_keeps_honest_peers_training_despite_a_sign_flipping_peer(make_swarm) -> None:
    clean = run_swarm(make_swarm, "clean, centered_clip", "centered_clip", attack=False)
    clipped = run_swarm(make_swarm, "attacked, centered_clip", "centered_clip", attack=True)
    control = run_swarm(make_swarm, "attacked, mean", "mean", attack=True)
    accuracy = {"clean": mean_accuracy(clean), "centered_clip": mean_accuracy(clipped), "mean": mean_accuracy(control)}
    print(
        "honest peers' mean held-out accuracy at the end:", {name: round(value, 3) for name, value in accuracy.items()}
    )

    # both CenteredClip runs went the whole way: every honest peer stopped at the same swarm global step
    assert all(report["global_step"] == GLOBAL_STEPS for report in clean + clipped), "not every peer reached the step"
    assert all(scenarios.all_finite(report) for report in clipped)
    # the clean run learns (10 classes: chance is 0.10; 0.53 after 12 global steps): measured 0.69-0.82 in 7 runs on
    # the shared 2-core machine (mean 0.78, sd ~0.05)
    assert accuracy["clean"] >= 0.55, accuracy
    # under attack CenteredClip stays close to the clean run: CenteredClip minus clean measured -0.04 to +0.11 in 6 runs
    # (one more at -0.13 had an honest peer stopped early by a then lower --max-steps). Each run's accuracy varies by
    # ~0.05 at this step, so their difference by ~0.07: 0.2 is about 3 of those, far above the mean control's loss
    assert accuracy["centered_clip"] >= accuracy["clean"] - 0.2, accuracy
    # the same attack wrecks the plain mean (parameters NaN, accuracy that of a constant prediction): measured
    # 0.08-0.14, 0.6-0.7 below CenteredClip; so the gap above comes from the aggregation, not an attack that is harmless
    assert accuracy["mean"] <= 0.3, accuracy
    assert accuracy["centered_clip"] >= accuracy["mean"] + 0.3, accuracy
