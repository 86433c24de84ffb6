"""The gradient round's matchmaking window widens after a round that missed a live peer, and the parameter rounds'
search follows it (pure logic, no swarm)."""

from __future__ import annotations

from types import SimpleNamespace

from lightning_moshpit.optimizer import AveragingRound, SwarmOptimizer


def _round(group_size: int, swarm_size: int, wanted: int = 0) -> AveragingRound:
    return AveragingRound(epoch=3, group_size=group_size, swarm_size=swarm_size, succeeded=group_size > 0, time=0.0,
                          wanted=wanted)  # fmt: skip


def _optimizer(matchmaking_time: float = 1.0, averaging_timeout: float = 10.0, group_size: int = 16) -> SimpleNamespace:
    return SimpleNamespace(matchmaking_time=matchmaking_time, averaging_timeout=averaging_timeout,
                           group_size=group_size, matchmaking_window=2 * matchmaking_time,
                           delay_grad_averaging=False)  # fmt: skip


def test_complete_rounds_keep_the_window_and_an_incomplete_one_widens_it_to_half_the_timeout() -> None:
    optimizer = _optimizer()
    SwarmOptimizer._widen_matchmaking_window(optimizer, _round(8, 8))
    SwarmOptimizer._widen_matchmaking_window(optimizer, _round(1, 1))  # alone: nothing to wait for
    assert optimizer.matchmaking_window == 2.0
    assert SwarmOptimizer.parameter_round_search_seconds.fget(optimizer) == 3.0  # matchmaking_time + window
    SwarmOptimizer._widen_matchmaking_window(optimizer, _round(5, 8))
    assert optimizer.matchmaking_window == 5.0
    assert SwarmOptimizer.parameter_round_search_seconds.fget(optimizer) == 6.0  # parameter rounds follow the window
    SwarmOptimizer._widen_matchmaking_window(optimizer, _round(0, 8))  # a failed round: already at the ceiling
    assert optimizer.matchmaking_window == 5.0


def test_grid_rounds_widen_only_when_their_bucket_missed_a_peer() -> None:
    grid = _optimizer(group_size=4)  # 8 peers on a 4 x 2 grid: buckets of 4, then of 2
    SwarmOptimizer._widen_matchmaking_window(grid, _round(2, 8, wanted=2))
    SwarmOptimizer._widen_matchmaking_window(grid, _round(4, 8, wanted=4))
    assert grid.matchmaking_window == 2.0
    SwarmOptimizer._widen_matchmaking_window(grid, _round(3, 8, wanted=4))
    assert grid.matchmaking_window == 5.0


def test_a_round_that_does_not_know_its_group_compares_with_the_swarm_up_to_group_size() -> None:
    optimizer = _optimizer(group_size=4)  # wanted=0: e.g. under delayed parameter updates' own assembly
    SwarmOptimizer._widen_matchmaking_window(optimizer, _round(4, 8))
    assert optimizer.matchmaking_window == 2.0
    SwarmOptimizer._widen_matchmaking_window(optimizer, _round(3, 8))
    assert optimizer.matchmaking_window == 5.0


def test_the_window_never_shrinks_below_twice_matchmaking_time() -> None:
    slow = _optimizer(matchmaking_time=4.0, averaging_timeout=6.0)
    SwarmOptimizer._widen_matchmaking_window(slow, _round(2, 3))
    assert slow.matchmaking_window == 8.0  # half the timeout (3 s) is below the initial 8 s window: kept
    assert SwarmOptimizer.parameter_round_search_seconds.fget(slow) == 6.0  # never past averaging_timeout
