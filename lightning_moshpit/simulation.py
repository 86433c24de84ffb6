"""A numpy simulator of decentralized averaging: how many rounds until N peers agree?

Every peer starts with one number drawn from N(0, 1). Each *round*, peers meet in groups and replace their number with
their group's mean. The swarm's disagreement is the variance of all N numbers (``np.var``, failed peers included);
the question is how many rounds it takes to fall below a target such as 1e-9. This is the experiment behind the
averaging table of the Moshpit SGD paper (Ryabinin et al., NeurIPS 2021), and this module follows the simulation code
the authors published with it (``averaging_experiments/`` in their repository):

- **Failures.** In each round every peer independently fails with probability ``p``. A failed peer keeps its value
  and drops out of its group for that round; the rest of its group averages without it.
- **all-reduce**: one group holding everyone. It is fragile: if *any* peer fails, the whole round is lost and nobody
  changes (a ring all-reduce stalls on a missing member).
- **random groups**: the alive peers are shuffled and cut into groups of ``M``; leftovers join groups round-robin.
- **gossip** (the paper's baseline): peers sit on a ring; each alive peer takes the mean of itself and its alive ring
  neighbours. Information travels one hop per round, so it needs O(N^2) rounds on a ring.
- **gossip_pairs**: random pairwise gossip, a fresh random matching each round (random groups of 2).
- **moshpit** (the paper's simulation): each peer gets a random cell of a d-dimensional grid of side M (M^d >= N, some
  cells stay empty when N < M^d) and keeps it. Round t averages along grid axis ``t mod d``: peers that share every
  other coordinate form a group. With N = M^d and no failures the swarm holds the exact mean after d rounds.
- **moshpit_hivemind**: what our strategy runs on hivemind. Peer ``i`` starts at the cell whose base-M digits are
  ``i`` (:func:`lightning_moshpit.averaging.grid_group_bits` packs peers into the first cells), and after each round
  every member of a group draws a distinct random bucket in ``range(M)`` as its new coordinate along the axis just
  averaged, as ``hivemind.averaging.key_manager.GroupKeyManager.update_key_on_group_assembled`` does with its "chunk
  key". A failed peer keeps its old coordinate. Peers that end up sharing a key are cut into groups of at most M, as
  hivemind's matchmaking caps a group at ``target_group_size``.

:func:`rounds_to_reach` runs one method on one seed; :func:`mean_rounds` averages it over seeds as the paper's table
does (capped at ``max_rounds``: a cell equal to the cap means "never got there").
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

#: Simulated averaging methods, in the order the benchmark prints them.
METHODS = ("all_reduce", "random_groups", "gossip", "gossip_pairs", "moshpit", "moshpit_hivemind")

Averager = Callable[[np.ndarray, np.ndarray, int], np.ndarray]


def grid_side_dims(num_peers: int, group_size: int, dims: int | None = None) -> int:
    """The grid dimension d: ``dims`` if given (checked to hold everyone), else the smallest d with M^d >= N."""
    if dims is None:
        dims = max(1, math.ceil(math.log(num_peers) / math.log(group_size) - 1e-9)) if num_peers > 1 else 1
    if group_size**dims < num_peers:
        raise ValueError(f"a grid of side {group_size} and {dims} dimensions holds {group_size**dims} < {num_peers} peers")
    return dims


def _group_means(values: np.ndarray, members: np.ndarray, group_ids: np.ndarray) -> np.ndarray:
    """Replace ``values[members]`` by the mean of their group (``group_ids`` aligned with ``members``)."""
    out = values.copy()
    if members.size == 0:
        return out
    _, inverse = np.unique(group_ids, return_inverse=True)
    sums = np.bincount(inverse, weights=values[members])
    counts = np.bincount(inverse)
    out[members] = (sums / counts)[inverse]
    return out


def all_reduce(values: np.ndarray, alive: np.ndarray, round_index: int) -> np.ndarray:
    """Everyone averages together, but only in a round where nobody failed."""
    return np.full_like(values, values.mean()) if alive.all() else values.copy()


def make_random_groups(group_size: int, rng: np.random.Generator) -> Averager:
    """Shuffle the alive peers and cut them into groups of ``group_size``; leftovers join groups round-robin."""

    def step(values: np.ndarray, alive: np.ndarray, round_index: int) -> np.ndarray:
        members = rng.permutation(np.flatnonzero(alive))
        num_groups = max(1, members.size // group_size)
        positions = np.arange(members.size)
        group_ids = np.where(positions < num_groups * group_size, positions // group_size, positions % num_groups)
        return _group_means(values, members, group_ids)

    return step


def ring_gossip(values: np.ndarray, alive: np.ndarray, round_index: int) -> np.ndarray:
    """Each alive peer takes the mean of itself and its alive neighbours on a ring (the paper's gossip baseline)."""
    weight = alive.astype(float)
    sums = values * weight + np.roll(values * weight, 1) + np.roll(values * weight, -1)
    counts = weight + np.roll(weight, 1) + np.roll(weight, -1)
    return np.where(alive, sums / np.maximum(counts, 1.0), values)


def _cells_to_coordinates(cells: np.ndarray, group_size: int, dims: int) -> np.ndarray:
    """Base-M digits of cell numbers: column ``k`` is coordinate ``c_k`` (digit of weight M^k)."""
    return np.stack([(cells // group_size**k) % group_size for k in range(dims)], axis=1)


def _line_ids(coordinates: np.ndarray, axis: int, group_size: int) -> np.ndarray:
    """A number per peer that is equal exactly for peers sharing every coordinate except ``axis``."""
    weights = group_size ** np.arange(coordinates.shape[1], dtype=np.int64)
    weights[axis] = 0
    return coordinates.astype(np.int64) @ weights


def make_moshpit(num_peers: int, group_size: int, dims: int, rng: np.random.Generator) -> Averager:
    """The paper's simulation: random fixed grid cells; round t averages along axis ``t mod d``."""
    cells = rng.choice(group_size**dims, size=num_peers, replace=False)
    coordinates = _cells_to_coordinates(cells, group_size, dims)

    def step(values: np.ndarray, alive: np.ndarray, round_index: int) -> np.ndarray:
        members = np.flatnonzero(alive)
        lines = _line_ids(coordinates[members], round_index % dims, group_size)
        return _group_means(values, members, lines)

    return step


def make_moshpit_hivemind(num_peers: int, group_size: int, dims: int, rng: np.random.Generator) -> Averager:
    """Our strategy's grid on hivemind: packed starting cells, then a random distinct bucket per member each round."""
    coordinates = _cells_to_coordinates(np.arange(num_peers), group_size, dims)

    def step(values: np.ndarray, alive: np.ndarray, round_index: int) -> np.ndarray:
        axis = round_index % dims
        members = np.flatnonzero(alive)
        lines = _line_ids(coordinates[members], axis, group_size)
        # peers sharing a key: at most M per group, as matchmaking caps a group at target_group_size
        order = np.lexsort((rng.random(members.size), lines))
        members, lines = members[order], lines[order]
        starts = np.r_[0, np.flatnonzero(np.diff(lines)) + 1]
        rank_in_line = np.arange(members.size) - np.repeat(starts, np.diff(np.r_[starts, members.size]))
        group_ids = lines * (num_peers + 1) + rank_in_line // group_size
        out = _group_means(values, members, group_ids)
        # each group's members take distinct random buckets along the axis just averaged (hivemind's chunk key)
        _, inverse, sizes = np.unique(group_ids, return_inverse=True, return_counts=True)
        permutations = np.argsort(rng.random((sizes.size, group_size)), axis=1)
        coordinates[members, axis] = permutations[inverse, rank_in_line % group_size]
        return out

    return step


def make_averager(method: str, num_peers: int, group_size: int, dims: int, rng: np.random.Generator) -> Averager:
    """Build one of :data:`METHODS` for a swarm of ``num_peers`` with group size (grid side) ``group_size``."""
    if method == "all_reduce":
        return all_reduce
    if method == "random_groups":
        return make_random_groups(group_size, rng)
    if method == "gossip":
        return ring_gossip
    if method == "gossip_pairs":
        return make_random_groups(2, rng)
    if method == "moshpit":
        return make_moshpit(num_peers, group_size, dims, rng)
    if method == "moshpit_hivemind":
        return make_moshpit_hivemind(num_peers, group_size, dims, rng)
    raise ValueError(f"`method` must be one of {list(METHODS)}, got {method!r}")


def simulate(
    method: str,
    num_peers: int,
    group_size: int,
    failure_prob: float = 0.0,
    rounds: int = 50,
    dims: int | None = None,
    seed: int = 0,
    target: float | None = None,
) -> list[float]:
    """Variance of the peers' values before round 1 and after each round (stops early once below ``target``).

    Args:
        method: one of :data:`METHODS`.
        num_peers: N, the swarm size.
        group_size: M, the group size (and the side of the Moshpit grid).
        failure_prob: p, the chance that a peer fails in a given round.
        rounds: how many rounds to run at most.
        dims: the grid dimension d for the Moshpit methods; default: the smallest d with M^d >= N.
        seed: seeds the initial values, the failures and every random choice.
        target: stop as soon as the variance falls below it.
    """
    if num_peers < 1:
        raise ValueError(f"`num_peers` must be >= 1, got {num_peers}")
    if group_size < 2:
        raise ValueError(f"`group_size` must be >= 2, got {group_size}")
    if not 0.0 <= failure_prob < 1.0:
        raise ValueError(f"`failure_prob` must be in [0, 1), got {failure_prob}")
    dims = grid_side_dims(num_peers, group_size, dims)
    rng = np.random.default_rng(seed)
    values = rng.normal(0.0, 1.0, num_peers)
    averager = make_averager(method, num_peers, group_size, dims, rng)
    history = [float(values.var())]
    for round_index in range(rounds):
        if target is not None and history[-1] < target:
            break
        alive = rng.random(num_peers) >= failure_prob
        values = averager(values, alive, round_index)
        history.append(float(values.var()))
    return history


def rounds_to_reach(history: list[float], target: float) -> int:
    """The first round after which the variance is below ``target`` (``len(history) - 1`` if it never gets there)."""
    for round_index, variance in enumerate(history):
        if variance < target:
            return round_index
    return len(history) - 1


def mean_rounds(
    method: str,
    num_peers: int,
    group_size: int,
    failure_prob: float,
    target: float,
    seeds: int = 10,
    max_rounds: int = 50,
    dims: int | None = None,
) -> float:
    """Rounds to reach ``target``, averaged over ``seeds`` seeds; a run that never reaches it counts ``max_rounds``."""
    results = [
        rounds_to_reach(
            simulate(method, num_peers, group_size, failure_prob, max_rounds, dims, seed=seed, target=target), target
        )
        for seed in range(seeds)
    ]
    return float(np.mean(results))
