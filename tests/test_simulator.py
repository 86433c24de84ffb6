"""The numpy averaging simulator (no peers, no network): the properties the Moshpit paper's analysis predicts."""

from __future__ import annotations

import numpy as np
import pytest

from lightning_moshpit.simulation import METHODS, make_averager, mean_rounds, rounds_to_reach, simulate

EXACT = 1e-20  # float64 round-off on values of order 1 leaves variances around 1e-32


@pytest.mark.parametrize("method", ["moshpit", "moshpit_hivemind"])
@pytest.mark.parametrize(("group_size", "dims"), [(4, 2), (4, 3), (8, 2), (32, 2)])
def test_full_grid_without_failures_reaches_the_exact_mean_in_d_rounds(method: str, group_size: int, dims: int) -> None:
    history = simulate(method, group_size**dims, group_size, failure_prob=0.0, rounds=dims, dims=dims, seed=3)
    assert history[dims] < EXACT
    assert all(variance > 1e-6 for variance in history[:dims]), "no earlier round can already hold the exact mean"


def test_all_reduce_reaches_the_exact_mean_in_one_round() -> None:
    history = simulate("all_reduce", 100, 2, failure_prob=0.0, rounds=1)
    assert history[0] > 0.1 and history[1] < EXACT


def test_all_reduce_loses_every_round_in_which_any_peer_fails() -> None:
    # with 512 peers and p = 0.01, a round has no failure with probability 0.99^512 = 0.6 %
    assert mean_rounds("all_reduce", 512, 32, 0.01, 1e-9, seeds=5) > 20


@pytest.mark.parametrize("method", ["gossip", "gossip_pairs"])
def test_gossip_variance_decreases_every_round(method: str) -> None:
    history = simulate(method, 256, 2, failure_prob=0.0, rounds=20, seed=1)
    assert all(later <= earlier + 1e-15 for earlier, later in zip(history, history[1:]))
    assert history[-1] < 0.5 * history[0]


@pytest.mark.parametrize("method", ["random_groups", "moshpit", "moshpit_hivemind"])
def test_failures_slow_convergence(method: str) -> None:
    without = mean_rounds(method, 256, 16, 0.0, 1e-9, seeds=5, dims=2)
    with_failures = mean_rounds(method, 256, 16, 0.05, 1e-9, seeds=5, dims=2)
    assert with_failures > without


@pytest.mark.parametrize("method", METHODS)
def test_averaging_without_failures_preserves_the_swarm_mean(method: str) -> None:
    """Equal-size group averaging neither creates nor loses mass, so the limit is the true mean."""
    rng = np.random.default_rng(0)
    values = rng.normal(size=64)
    averager = make_averager(method, 64, 4, 3, rng)
    alive = np.ones(64, dtype=bool)
    for round_index in range(5):
        new_values = averager(values, alive, round_index)
        assert new_values.var() <= values.var() + 1e-12
        values = new_values
    assert values.mean() == pytest.approx(np.random.default_rng(0).normal(size=64).mean(), abs=1e-12)


def test_rounds_to_reach_counts_rounds_and_caps_at_the_history_length() -> None:
    assert rounds_to_reach([1.0, 0.5, 1e-10], 1e-9) == 2
    assert rounds_to_reach([1.0, 0.5], 1e-9) == 1


def test_bad_arguments_name_the_argument() -> None:
    with pytest.raises(ValueError, match="method"):
        simulate("ring", 8, 2)
    with pytest.raises(ValueError, match="failure_prob"):
        simulate("moshpit", 8, 2, failure_prob=1.0)
    with pytest.raises(ValueError, match="holds"):
        simulate("moshpit", 100, 4, dims=2)
