"""Averaging configuration: Moshpit grid keys and compression by name.

**The Moshpit grid.** hivemind forms averaging groups from peers that declare the same *group key* in the DHT. A key
is a string of bits; after every successful round each member of a group appends ``log2(M)`` fresh bits (a distinct
index inside its group) and drops the oldest ones (see ``hivemind.averaging.key_manager``). If peers start on a
d-dimensional grid of side M, i.e. peer ``i`` writes its index in base M as digits ``(c0, c1, ..., c_{d-1})`` and
declares the key ``bits(c1) + ... + bits(c_{d-1})``, then round 1 averages along ``c0``, round 2 along ``c1`` and so
on: N = M^d peers hold the exact global average after d rounds, yet every group has only M members.

:func:`grid_group_bits` computes that starting key. The number of key bits adapts to the swarm size: a swarm that fits
in one group (N <= M) gets the empty key, so small swarms do an exact all-reduce every round.
"""

from __future__ import annotations

import functools
import itertools
import math
import random
from typing import Callable

from hivemind.compression import (
    CompressionBase,
    Float16Compression,
    NoCompression,
    ScaledFloat16Compression,
    SizeAdaptiveCompression,
    Uniform8BitQuantization,
)

#: Tensors with at least this many elements get 8-bit compression under ``"size-adaptive"``; smaller ones fp16.
SIZE_ADAPTIVE_THRESHOLD = 2**16

_COMPRESSIONS: dict[str, Callable[[], CompressionBase]] = {
    "none": NoCompression,
    "fp16": Float16Compression,
    "scaled-fp16": ScaledFloat16Compression,
    "uint8": Uniform8BitQuantization,
    "size-adaptive": lambda: SizeAdaptiveCompression(
        threshold=SIZE_ADAPTIVE_THRESHOLD, less=Float16Compression(), greater_equal=Uniform8BitQuantization()
    ),
}

COMPRESSION_NAMES = tuple(_COMPRESSIONS)


def make_compression(name: str) -> CompressionBase:
    """Build one of hivemind's compression schemes from its short name (see ``COMPRESSION_NAMES``)."""
    if not isinstance(name, str) or name.lower() not in _COMPRESSIONS:
        raise ValueError(f"`compression` must be one of {list(COMPRESSION_NAMES)}, got {name!r}")
    return _COMPRESSIONS[name.lower()]()


def check_group_size(group_size: int) -> int:
    """Validate the Moshpit group side M: a power of two, at least 2 (hivemind draws log2(M) key bits per round)."""
    if (
        isinstance(group_size, bool)
        or not isinstance(group_size, int)
        or group_size < 2
        or group_size & (group_size - 1)
    ):
        raise ValueError(f"`group_size` must be a power of two >= 2 (e.g. 2, 4, 8, 16), got {group_size!r}")
    return group_size


def bits_per_dimension(group_size: int) -> int:
    """How many key bits index one grid coordinate: log2(M)."""
    return check_group_size(group_size).bit_length() - 1


def grid_dimensions(num_peers: int, group_size: int) -> int:
    """The number of grid dimensions d for a swarm: the smallest d with M^d >= num_peers (at least 1)."""
    if num_peers <= group_size:
        return 1
    return max(1, math.ceil(math.log(num_peers) / math.log(group_size) - 1e-9))


def key_length(num_peers: int, group_size: int) -> int:
    """Number of group-key bits for a swarm of ``num_peers``: (d - 1) * log2(M); 0 when one group holds everyone."""
    return (grid_dimensions(num_peers, group_size) - 1) * bits_per_dimension(group_size)


def grid_group_bits(index: int, num_peers: int, group_size: int) -> str:
    """The starting group key of the peer with grid position ``index`` in a swarm of ``num_peers``.

    Coordinate ``c1`` sits leftmost because hivemind drops the leftmost bits after each round, so the key moves on to
    the next grid dimension exactly as the Moshpit paper prescribes.

    >>> [grid_group_bits(i, 8, 2) for i in range(8)]
    ['00', '00', '10', '10', '01', '01', '11', '11']
    """
    if index < 0:
        raise ValueError(f"`index` must be >= 0, got {index}")
    nbits = bits_per_dimension(group_size)
    digits = grid_dimensions(num_peers, group_size)
    coordinates = [(index // group_size**dim) % group_size for dim in range(digits)]
    return "".join(format(coordinate, f"0{nbits}b") for coordinate in coordinates[1:])


@functools.lru_cache(maxsize=64)
def grid_sides(num_peers: int, group_size: int) -> tuple[int, ...]:
    """The sides of the training grid for ``num_peers``: d = ``grid_dimensions`` sides, each at most ``group_size``,
    whose product is the smallest at least ``num_peers`` (ties: the smaller largest side), largest first.

    A full grid (N = M^d) keeps sides of M; otherwise the sides shrink so that few cells stay empty. Base-M
    positions for 8 peers and M = 4 would fill a 4 x 4 grid's first 2 rows (fine: 4 x 2), but for 17 peers and M = 16
    they fill one row of 16 and one cell of the next, and 15 of 17 peers would find no partner along the second
    dimension; sides 6 x 3 (18 cells) leave nobody alone.

    >>> grid_sides(4, 2), grid_sides(8, 4), grid_sides(17, 16), grid_sides(3, 16)
    ((2, 2), (4, 2), (6, 3), (3,))
    """
    dims = grid_dimensions(num_peers, group_size)
    if dims == 1:
        return (max(num_peers, 1),)
    best: tuple[int, ...] = ()
    for sides in itertools.combinations_with_replacement(range(group_size, 1, -1), dims):
        product = math.prod(sides)
        if product >= num_peers and (not best or (product, sides[0]) < (math.prod(best), best[0])):
            best = sides
    return best


def grid_bucket(index: int, num_peers: int, group_size: int, round_number: int) -> tuple[str, int]:
    """The bucket of the peer at grid position ``index`` in the averaging round ``round_number``: (key, population).

    Positions fill the grid of :func:`grid_sides` in mixed radix. Round r groups the peers that share every grid
    coordinate but ``c_(r mod d)``, so d rounds in a row average along every dimension once, whatever happened
    before; on a full grid that is the exact mean. hivemind's own key rotation (see the module docstring) carries the
    grid from one round to the next instead: one failed bucket leaves its members' keys out of phase with the
    others', and a group smaller than M scatters its members over M buckets. Deriving the key from the round number
    and a position in the sorted live swarm needs no history. The population is how many of the ``num_peers``
    share this bucket: the group a complete round holds (1: this peer has no partner in this round, which happens
    only on a grid with empty cells).

    >>> [grid_bucket(i, 4, 2, 0) for i in range(4)]
    [('0', 2), ('0', 2), ('1', 2), ('1', 2)]
    >>> [grid_bucket(i, 4, 2, 1)[0] for i in range(4)]
    ['0', '1', '0', '1']
    >>> grid_bucket(0, 8, 4, 0), grid_bucket(0, 8, 4, 1)
    (('00', 4), ('00', 2))
    """
    if not 0 <= index < num_peers:
        raise ValueError(f"`index` must be in [0, {num_peers}), got {index}")
    nbits = bits_per_dimension(group_size)
    sides = grid_sides(num_peers, group_size)
    along = round_number % len(sides)

    def others(position: int) -> list[int]:
        coordinates = []
        for dim, side in enumerate(sides):
            if dim != along:
                coordinates.append(position % side)
            position //= side
        return coordinates

    mine = others(index)
    population = sum(others(position) == mine for position in range(num_peers))
    return "".join(format(coordinate, f"0{nbits}b") for coordinate in mine), population


#: Key bits that tell apart the rounds of consecutive global steps on a grid (see :func:`round_key`).
STEP_BITS = 2


def round_key(bucket_bits: str, step: int) -> str:
    """The group key bits of a grid round: its bucket's bits, then the global step modulo 4 (``STEP_BITS`` bits).

    Grid buckets reuse the same bit strings from one dimension to the next, so without the step a peer one step
    behind, still in the round of step s, shares its key with a bucket of step s + 1 and joins it: measured in the
    4-peer ``group_size=2`` test, 3 such rounds in one run, each leaving a peer to reload the swarm's state and a
    bucket of the next step without its partner. Off the grid (no bucket bits) the key stays empty: one group holds
    everyone, and a late member is handled as a round of another step (``SwarmOptimizer._members_ahead``).

    >>> round_key("01", 5), round_key("", 5)
    ('0101', '')
    """
    if not bucket_bits:
        return ""
    return bucket_bits + format(step % 2**STEP_BITS, f"0{STEP_BITS}b")


def averager_options(group_size: int, matchmaking_time: float, group_bits: str = "") -> dict:
    """Keyword arguments for a hivemind averager that joins the Moshpit grid in bucket ``group_bits``.

    ``request_timeout`` is 0.4 x ``matchmaking_time``: hivemind warns (and can deadlock) when a follower waits for a
    leader's answer as long as the leader gathers its group.
    """
    return dict(
        target_group_size=check_group_size(group_size),
        request_timeout=0.4 * matchmaking_time,
        initial_group_bits=group_bits,
    )


def random_group_bits(length: int, rng: random.Random | None = None) -> str:
    """A random key of ``length`` bits: used to move a peer that could not find a group to another bucket."""
    rng = rng or random.Random()
    return "".join(rng.choice("01") for _ in range(length))
