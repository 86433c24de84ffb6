"""Scenario: a private swarm. An outsider with the wrong secret is refused; a member that lies about its progress is
ignored.

Two honest peers share ``MOSHPIT_SWARM_SECRET``. While they train:

- an *outsider* with another secret tries to join through their bootstrap address: it must exit with a clear error
  (not hang), contribute nothing, and the insiders must log a warning naming its peer id;
- a *liar* that holds the right secret publishes a progress record claiming 10**9 samples toward the current step
  (:mod:`lightning_moshpit.testing.liar`): the insiders must ignore it with a warning naming it, and keep taking
  global steps only once they really gathered about ``target_batch_size`` samples.
"""

from __future__ import annotations

import re

import pytest

from lightning_moshpit.testing import scenarios

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

SECRET = {"MOSHPIT_SWARM_SECRET": "insiders-only-0123456789abcdef"}
WRONG_SECRET = {"MOSHPIT_SWARM_SECRET": "a-guess-that-is-wrong-0123456"}
LOCAL_STEPS = 64  # with 2 peers and 16-sample batches, a global step every 16 local steps: about 4 global steps
LIAR_MODULE = "lightning_moshpit.testing.liar"


def test_an_outsider_is_refused_and_a_liar_cannot_force_early_steps(make_swarm) -> None:
    swarm = make_swarm()
    args = [*scenarios.PEER_ARGS, "--min-peers", "2", "--max-steps", str(LOCAL_STEPS)]
    swarm.start_peer([*args, "--seed", "0"], env=SECRET)
    # the outsider starts with the insiders, so that it knocks while they run (it exits as soon as it is refused)
    outsider = swarm.start_peer([*args, "--seed", "2"], bootstrap=False, env=WRONG_SECRET)
    swarm.start_peer([*args, "--seed", "1"], env=SECRET, bootstrap=False)
    liar = swarm.start_peer([], bootstrap=False, env=SECRET, module=LIAR_MODULE)

    codes = swarm.wait(90)
    insider_indices = [0, 2]
    assert [codes[i] for i in insider_indices] == [0, 0], [swarm.log(i)[-3000:] for i in insider_indices]
    assert codes[liar] == 0, swarm.log(liar)[-3000:]

    # the outsider: a clear error naming the cause, and an exit rather than a hang
    outsider_log = swarm.log(outsider)
    assert codes[outsider] not in (0, None), outsider_log[-3000:]
    error = next((line for line in outsider_log.splitlines() if line.startswith("ConnectionError")), "")
    assert "MOSHPIT_SWARM_SECRET" in error, outsider_log[-3000:]
    outsider_id = re.search(r"This peer \(id (\w+)\)", error).group(1)
    print(f"outsider saw: {error[:600]}")

    insiders = [scenarios.load_report(swarm.report_path(i)) for i in insider_indices]
    insider_logs = [swarm.log(i) for i in insider_indices]
    result = scenarios.figures("private swarm (outsider + liar)", insiders)

    # the insiders named the outsider, and never counted or averaged with anyone but each other
    refusals = [line for log in insider_logs for line in log.splitlines() if outsider_id in line]
    assert refusals, "no insider logged a warning naming the outsider's peer id"
    print(f"insiders logged: {refusals[0].strip()[:300]}")
    for report in insiders:
        assert max(report["num_peers"]) == 2, "an insider counted the outsider or the liar as a peer"
        succeeded = [r["group_size"] for r in report["rounds"] if r["succeeded"]]
        assert succeeded and set(succeeded) == {2}, report["rounds"]
    step, difference = scenarios.max_param_difference(insiders)
    print(f"insiders' max |parameter difference| at global step {step}: {difference:.2e}")
    assert difference < 1e-4

    # the liar: named in a warning, and no early steps (about target_batch_size honest samples per global step)
    liar_id = scenarios.load_report(swarm.report_path(liar))["peer_id"]
    ignored = [line for log in insider_logs for line in log.splitlines() if "Ignored the progress record" in line]
    assert any(liar_id in line for line in ignored), f"no warning names the liar {liar_id}"
    print(f"insiders logged: {ignored[0].strip()[:300]}")
    global_steps = max(report["global_step"] for report in insiders)
    honest_samples = sum(report["samples"] for report in insiders)
    per_step = honest_samples / max(global_steps, 1)
    print(f"{global_steps} global steps for {honest_samples} honest samples: {per_step:.0f} samples per step "
          f"(target {scenarios.TARGET_BATCH_SIZE}); {result.rounds_succeeded}/{result.rounds_attempted} rounds")  # fmt: skip
    assert global_steps >= 2, "the swarm barely trained; the check below would prove nothing"
    assert per_step >= 0.7 * scenarios.TARGET_BATCH_SIZE, "the swarm stepped before gathering its target batch"
