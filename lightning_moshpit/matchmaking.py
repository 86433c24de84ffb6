"""Gradient rounds that assemble as soon as every live peer has joined, so a late peer gets time to join.

hivemind 1.1.12's leader assembles its group when the group is full (``target_group_size``, which is the grid's
``group_size``, 16 by default) or when its matchmaking window ends (``matchmaking_time`` after it booked the round).
In a swarm smaller than ``group_size`` the group is never "full", so every round closed at the end of the first
booker's window, and a peer that booked later was left out. Measured with 4 fast peers on 2 cores (soak row "4 peers,
fast", target 2048, steps of about 1.3 s): rounds alternated between all 4 and 3+1, 13 to 26 of about 31 rounds
complete; the peer left out was the slowest process, which noticed the end of the step last and then joined the
*next* step's round.

With the target set to the live swarm size (``min(num_peers, group_size)``), the leader starts the all-reduce the
moment the last peer joins, so the window can be longer (``2 x matchmaking_time``) at no cost when everyone is on
time; only a round that really misses a peer waits for the whole window. hivemind fixes ``target_group_size`` when the
averager process starts, so :func:`set_target_group_size` sends the new value through the averager's control pipe,
to a handler :func:`install` adds to ``DecentralizedAverager`` (before the averager processes fork).
"""

from __future__ import annotations

from typing import Any

from hivemind.averaging import DecentralizedAverager
from hivemind.utils.mpfuture import MPFuture

_HANDLER = "_moshpit_set_target_group_size"


async def _set_target_group_size(self: DecentralizedAverager, size: int, future: MPFuture) -> None:
    """Runs in the averager process: the group size at which this peer, as a leader, starts the all-reduce."""
    try:
        self._matchmaking.target_group_size = size
        self._matchmaking.potential_leaders.target_group_size = size
        future.set_result(None)
    except Exception as error:  # noqa: BLE001 - reported to the caller through the future
        if not future.done():
            future.set_exception(error)


def install() -> None:
    """Add the control-pipe handler to hivemind's averager class (idempotent)."""
    if not hasattr(DecentralizedAverager, _HANDLER):
        setattr(DecentralizedAverager, _HANDLER, _set_target_group_size)


def set_target_group_size(averager: DecentralizedAverager, size: int) -> Any:
    """Ask ``averager``'s process to assemble groups of ``size`` as soon as they are complete; returns a future."""
    if size < 2:
        raise ValueError(f"target group size must be at least 2, got {size}")
    future = MPFuture()
    averager._outer_pipe.send((_HANDLER, [], dict(size=size, future=future)))
    return future
