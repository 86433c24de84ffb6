"""Which parameter rounds a state averager applies (``lightning_moshpit.consistent_state.round_outcome``) and how long
one looks for its group (``search_timeout``): pure logic on hivemind's ``StepControl``. The paused-peer scenario that
needed the first runs with real peers in ``tests/scenarios/test_pause.py``, the 4-peer grid that needed the second in
``tests/test_swarm_modes.py``."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

from hivemind.p2p import PeerID

from lightning_moshpit.consistent_state import FINAL_ROUND, gathered_steps, round_outcome, search_timeout

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


def test_a_round_of_a_global_step_searches_at_most_the_bound() -> None:
    assert search_timeout(7, 10.0, 3.0) == 3.0
    assert search_timeout(7, 2.0, 3.0) == 2.0  # a shorter timeout stays
    assert search_timeout(7, None, 3.0) == 3.0
    assert search_timeout(7, 10.0, None) == 10.0  # no bound set: hivemind's timeout


def test_a_final_round_keeps_its_timeout() -> None:
    assert search_timeout({FINAL_ROUND: 16}, 30.0, 3.0) == 30.0
    assert search_timeout(True, 30.0, 3.0) == 30.0  # a bool is not a step
