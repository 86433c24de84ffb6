"""Which parameter rounds a state averager applies (``lightning_moshpit.consistent_state.round_outcome``): pure logic
on hivemind's ``StepControl``; the paused-peer scenario that needed it runs with real peers in
``tests/scenarios/test_pause.py``."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

from hivemind.p2p import PeerID

from lightning_moshpit.consistent_state import FINAL_ROUND, gathered_steps, round_outcome

PEERS = [PeerID(f"peer{i}".encode()) for i in range(3)]


# hivemind's StepControl is an MPFuture (it needs the averager's process backend); round_outcome only reads the
# future interface (done, cancelled, exception, result), which a concurrent.futures.Future has too
def finished(gathered: list[Any]) -> Future:
    control: Future = Future()
    control.set_result(dict(zip(PEERS, gathered)))
    return control


def failed() -> Future:
    control: Future = Future()
    control.set_exception(TimeoutError("could not find a group"))
    return control


def test_a_round_of_members_at_one_global_step_is_applied() -> None:
    assert round_outcome(finished([9, 9, 9])) is None
    assert round_outcome(finished([{FINAL_ROUND: 16}, 16])) is None  # a final round that met a background round


def test_a_round_that_mixed_global_steps_is_not_applied() -> None:
    # the paused peer's round of step 4 met the others' round of step 9
    assert round_outcome(finished([9, 4, 9])) == "its members were at different global steps (4, 9)"


def test_a_failed_or_unfinished_round_is_not_applied() -> None:
    assert round_outcome(failed()) == "it failed"
    assert round_outcome(Future()) == "it failed"  # still running: a newer round may be using the buffers


def test_no_control_means_nothing_to_check() -> None:
    assert round_outcome(None) is None


def test_gathered_steps_reads_plain_steps_and_final_round_tags_only() -> None:
    assert gathered_steps({PEERS[0]: 3, PEERS[1]: {FINAL_ROUND: 5}, PEERS[2]: "other"}) == {3, 5}
    assert gathered_steps({PEERS[0]: True, PEERS[1]: None}) == set()
