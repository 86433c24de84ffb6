"""Scenario: a private swarm. An outsider with the wrong secret is refused; a member that lies about its progress is
ignored.

Two honest peers share ``MOSHPIT_SWARM_SECRET``. While they train:

- an *outsider* with another secret tries to join through their bootstrap address: it must exit with a clear error
  (not hang), contribute nothing, and the insiders must log a warning naming its peer id;
- a *thief* calls the bootstrap insider's state averager directly over libp2p (no DHT) and asks for its training
  state (:mod:`lightning_moshpit.testing.state_thief`): proving the right secret it gets the state (the control),
  proving a wrong one it gets nothing, and the insider logs a warning naming it;
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
THIEF_MODULE = "lightning_moshpit.testing.state_thief"
PROTOCOL_VIOLATION = 14  # hivemind.proto.averaging_pb2.PROTOCOL_VIOLATION


def test_an_outsider_is_refused_and_a_liar_cannot_force_early_steps(make_swarm) -> None:
    swarm = make_swarm()
    args = [*scenarios.PEER_ARGS, "--min-peers", "2", "--max-steps", str(LOCAL_STEPS)]
    swarm.start_peer([*args, "--seed", "0"], env=SECRET)
    # the outsider starts with the insiders, so that it knocks while they run (it exits as soon as it is refused)
    outsider = swarm.start_peer([*args, "--seed", "2"], bootstrap=False, env=WRONG_SECRET)
    swarm.start_peer([*args, "--seed", "1"], env=SECRET, bootstrap=False)
    liar = swarm.start_peer([], bootstrap=False, env=SECRET, module=LIAR_MODULE)
    thief = swarm.start_peer(["--wrong-secret", WRONG_SECRET["MOSHPIT_SWARM_SECRET"]], bootstrap=False, env=SECRET,
                             module=THIEF_MODULE)  # fmt: skip

    codes = swarm.wait(90)
    insider_indices = [0, 2]
    assert [codes[i] for i in insider_indices] == [0, 0], [swarm.log(i)[-3000:] for i in insider_indices]
    assert codes[liar] == 0, swarm.log(liar)[-3000:]
    assert codes[thief] == 0, swarm.log(thief)[-3000:]

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

    # the thief: a member's proof gets the state (so the path works), an outsider's proof gets nothing and is named
    stolen = scenarios.load_report(swarm.report_path(thief))
    print(f"state download: {stolen}")
    assert stolen["member_messages"] > 0, "even a member could not download the state: the refusal below proves nothing"
    assert stolen["outsider_messages"] == 0, "an outsider downloaded an insider's training state"
    assert stolen["outsider_codes"] and set(stolen["outsider_codes"]) == {PROTOCOL_VIOLATION}, stolen
    named = [line for line in insider_logs[0].splitlines() if stolen["outsider_id"] in line]
    assert any("secret" in line for line in named), "no insider warning names the thief's peer id"
    print(f"insider logged: {named[0].strip()[:300]}")

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


def test_a_member_that_joins_late_downloads_the_state_after_proving_the_secret(make_swarm, tmp_path) -> None:
    # The real client path of the state-download gate: a late member proves the secret to the state holders it finds
    # in the DHT, then downloads as hivemind does. Without a working proof it would keep its own random init.
    swarm = make_swarm()
    progress, stop = tmp_path / "progress", tmp_path / "stop"
    swarm.start_peer([*scenarios.PEER_ARGS, "--max-steps", "2000", "--progress-file", str(progress),
                      "--stop-file", str(stop)], env=SECRET)  # fmt: skip
    swarm.wait_for_global_step(progress, 2, timeout=60)
    late = swarm.start_peer([*scenarios.PEER_ARGS, "--max-steps", "20", "--seed", "1"], bootstrap=False, env=SECRET)
    late_code = swarm.processes[late].wait(timeout=60)
    stop.touch()
    codes = swarm.wait(30)
    assert codes == [0, 0] and late_code == 0, [swarm.log(i)[-3000:] for i in range(2)]
    first, joiner = (scenarios.load_report(swarm.report_path(i)) for i in range(2))
    joined_at = joiner["first_step_global"]
    reference = first["snapshots"][str(joined_at)]
    gap = max(abs(a - b) for a, b in zip(joiner["first_step_params"], reference))
    print(f"late member joined at global step {joined_at}: max |parameter - swarm's| {gap:.2e}")
    assert joined_at >= 2
    refusals = [line for line in swarm.log(0).splitlines() if "state download" in line or "failed to prove" in line]
    assert not refusals, refusals
    assert gap < 0.05, "the late member did not get the swarm's parameters"
