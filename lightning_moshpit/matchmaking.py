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

A member's first part that arrives before the member registered the group
--------------------------------------------------------------------------
A member registers a group for its all-reduce only after its own trigger (``allow_allreduce``); a leader that was
triggered already starts sending parts the moment the group is assembled. hivemind 1.1.12's
``DecentralizedAverager.rpc_aggregate_part`` covers that case by waiting *once* on ``_pending_groups_registered``, an
event that every registration and unregistration of *any* round of that averager sets. Under delayed parameter updates
the next round is booked while the previous one still runs, so the previous round's end has already set the event:
the wait returns at once and the member answers ``BAD_GROUP_ID`` to its own group. Measured (2 DPU peers, DEBUG logs,
``tests/test_swarm_modes.py -k dpu``, 2 of 2 runs): the leader sent to a follower 17 ms after assembly, got
``BAD_GROUP_ID``, finished with "received 75.7% results", and the follower waited ``sender_timeout`` (3.3 s) for the
leader's parts and finished with "Reducer: received 50.0% of input tensors": a partial all-reduce on both.
:func:`install` replaces that handler with one that waits until the group is registered, for at most the
all-reduce's ``reducer_timeout`` (the leader gives up on an answer after that long anyway). A part for a group this
member never registers (a stale leader, or a made-up group id) is answered ``BAD_GROUP_ID`` after that bound rather
than at once, so such a request holds one handler open for up to ``reducer_timeout``.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

from hivemind.averaging import DecentralizedAverager
from hivemind.p2p import P2PContext
from hivemind.proto import averaging_pb2
from hivemind.utils.asyncio import achain, anext, as_aiter
from hivemind.utils.mpfuture import MPFuture

_HANDLER = "_moshpit_set_target_group_size"
#: How often a part that arrived before its group was registered looks again (seconds).
REGISTRATION_POLL = 0.01
#: Bound on that wait when the averager has no ``reducer_timeout`` (hivemind's default has none).
DEFAULT_REGISTRATION_WAIT = 30.0


async def _set_target_group_size(self: DecentralizedAverager, size: int, future: MPFuture) -> None:
    """Runs in the averager process: the group size at which this peer, as a leader, starts the all-reduce.

    The key manager's ``target_group_size`` only grows: after each round hivemind draws every member a distinct
    index in ``range(target_group_size)``, and a group larger than that (the final round of a grid, one group of
    every stopping peer) raised ``ValueError: Sample larger than population`` there, failing the round."""
    try:
        self._matchmaking.target_group_size = size
        self._matchmaking.potential_leaders.target_group_size = size
        keys = self._matchmaking.group_key_manager
        keys.target_group_size = max(keys.target_group_size or 0, size)
        future.set_result(None)
    except Exception as error:  # noqa: BLE001 - reported to the caller through the future
        if not future.done():
            future.set_exception(error)


async def _rpc_aggregate_part(
    self: DecentralizedAverager, stream: AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
) -> AsyncIterator[averaging_pb2.AveragingData]:
    """hivemind's handler, but a part that arrives before its group is registered here waits for the registration
    (see the module docstring) instead of one wake-up of a shared event."""
    request = await anext(stream)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + (self.allreduce_kwargs.get("reducer_timeout") or DEFAULT_REGISTRATION_WAIT)
    # polling, not hivemind's event: that event is shared by every round of this averager, so it cannot say whether
    # *this* group was registered
    while request.group_id not in self._running_groups and loop.time() < deadline:
        await asyncio.sleep(REGISTRATION_POLL)
    future = self._running_groups.get(request.group_id)
    if future is None:
        yield averaging_pb2.AveragingData(code=averaging_pb2.BAD_GROUP_ID)
        return
    # shielded: if the sender gives up, this handler is cancelled, and an unshielded await would cancel the future
    # that the member's own all-reduce is about to resolve (its set_result would then fail the whole round)
    group = await asyncio.shield(future)
    async for message in group.rpc_aggregate_part(achain(as_aiter(request), stream), context):
        yield message


def install() -> None:
    """Add the control-pipe handler to hivemind's averager class and replace its ``rpc_aggregate_part`` (idempotent;
    before any averager starts, so that every averager process registers these)."""
    if not hasattr(DecentralizedAverager, _HANDLER):
        setattr(DecentralizedAverager, _HANDLER, _set_target_group_size)
        DecentralizedAverager.rpc_aggregate_part = _rpc_aggregate_part


def set_target_group_size(averager: DecentralizedAverager, size: int) -> Any:
    """Ask ``averager``'s process to assemble groups of ``size`` as soon as they are complete; returns a future."""
    if size < 2:
        raise ValueError(f"target group size must be at least 2, got {size}")
    future = MPFuture()
    averager._outer_pipe.send((_HANDLER, [], dict(size=size, future=future)))
    return future
