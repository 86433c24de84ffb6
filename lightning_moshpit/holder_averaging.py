"""Holder-weighted averaging: each tensor is averaged only over the peers that trained it, and sent only where needed.

**Why.** In ResIST and IST (see :mod:`lightning_moshpit.callbacks.resist`) every peer trains a random *part* of the
model for a round. Averaging the whole model would mix the parts a peer trained with the stale copies of the parts it
skipped, and would send the whole model although most of it did not change. What such methods need instead is, for
every tensor ``t`` of the averaged state:

- the new value is the mean over the group members that *hold* ``t`` this round (trained it);
- a member that needs ``t`` next round receives that mean; a member that does not need it keeps its own copy;
- if no member of the group holds ``t``, everybody keeps their own copy ("nobody trained it: keep its value").

**How it rides on hivemind.** hivemind's butterfly all-reduce (``AllReduceRunner``) cuts every tensor into parts (a
part never spans two tensors) and gives each group member a contiguous share of the parts to reduce. Every member
streams its parts of that share to the reducer and gets the reduced parts back. :class:`HolderAllReduceRunner` keeps
that protocol, the groups, timeouts and bans, and changes only what is in the messages:

- a sender streams a *real* part only for tensors it holds; for the others it sends an empty placeholder with weight
  0, which the reducer counts as "no contribution" (``TensorPartReducer`` weighs each part separately);
- the reducer answers with the *averaged value* (not hivemind's delta, because a non-holder sent nothing to take a
  delta from) for tensors the sender needs and somebody held, and an empty placeholder otherwise; the receiver turns
  a value into its own delta and a placeholder into "no change".

Members learn each other's masks from hivemind's all-gather (``DecentralizedAverager.step(gather=...)``): every peer
sends a :class:`HolderMasks` with its matchmaking request, so all members of a group see the same masks and agree on
every decision above. Groups can be Moshpit groups (``target_group_size`` < swarm size): each group computes the
holder-weighted mean over its own holders, which is exactly what local SGD over a grid does for ordinary averaging.

**Rounds.** Masks may carry a round number. Methods whose tensors change meaning from round to round (IST gathers
random neurons into fixed slots) set it; a group then uses the masks of the members at the group's latest round only,
and members at another round neither send nor receive. ResIST's tensors are real parameters, so it passes no round.

**Bytes.** :attr:`HolderAverager.bytes_sent` counts the serialized size of every message this peer sent in all-reduce
rounds (as sender and as reducer), which is what the benchmark reports per round; matchmaking and DHT traffic
(a few hundred bytes per round, the same with or without holders) are not counted.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import logging
import multiprocessing as mp
from collections.abc import Iterable, Sequence
from typing import Any, AsyncIterator, Callable, Optional

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AllReduceRunner, AveragingMode
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.load_balancing import load_balance_peers
from hivemind.averaging.matchmaking import MatchmakingException
from hivemind.averaging.partition import AllreduceException, BannedException, TensorPartReducer
from hivemind.compression import deserialize_torch_tensor
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils import get_dht_time
from hivemind.utils.asyncio import (
    aiter_with_timeout,
    as_aiter,
    attach_event_on_finished,
    azip,
    enter_asynchronously,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class HolderMasks:
    """What one peer contributes to and wants from a holder-weighted round, by index into the averaged tensors.

    - ``sends``: tensors this peer trained (holds) this round; only these enter the means.
    - ``needs``: tensors whose mean this peer wants back (typically what it will train next round); the others keep
      this peer's own value.
    - ``round``: optional round number; see the module docstring.
    """

    sends: frozenset[int]
    needs: frozenset[int]
    round: Optional[int] = None

    @classmethod
    def full(cls, num_tensors: int, round: Optional[int] = None) -> "HolderMasks":
        """Masks of a peer that holds and needs everything: plain (full-model) averaging."""
        everything = frozenset(range(num_tensors))
        return cls(everything, everything, round)

    def to_record(self) -> dict:
        return {"sends": sorted(self.sends), "needs": sorted(self.needs), "round": self.round}

    @classmethod
    def from_record(cls, record: Any) -> "HolderMasks":
        if not isinstance(record, dict):
            raise AllreduceException(f"a group member sent no holder masks (got {type(record).__name__})")
        return cls(frozenset(int(i) for i in record["sends"]), frozenset(int(i) for i in record["needs"]),
                   None if record.get("round") is None else int(record["round"]))  # fmt: skip


def effective_masks(masks: Sequence[HolderMasks]) -> list[HolderMasks]:
    """The masks a group acts on: with round numbers, members behind the group's latest round send and get nothing."""
    rounds = [m.round for m in masks if m.round is not None]
    if not rounds:
        return list(masks)
    latest = max(rounds)
    empty = HolderMasks(frozenset(), frozenset(), latest)
    return [m if m.round == latest else empty for m in masks]


def holder_weighted_average(
    values: Sequence[Sequence[torch.Tensor]], masks: Sequence[HolderMasks], weights: Optional[Sequence[float]] = None
) -> list[list[torch.Tensor]]:
    """What a holder-weighted round leaves on every member, computed in one process (the specification).

    ``values[i][t]`` is member ``i``'s tensor ``t``. Returns the new tensors of every member: for ``t`` in
    ``needs_i`` with at least one holder, the weighted mean over holders; otherwise member ``i``'s own value.
    :class:`HolderAllReduceRunner` computes the same thing over the network (tests compare the two).
    """
    masks = effective_masks(masks)
    weights = [1.0] * len(values) if weights is None else list(weights)
    num_tensors = len(values[0])
    means: list[Optional[torch.Tensor]] = []
    for t in range(num_tensors):
        holders = [i for i, m in enumerate(masks) if t in m.sends and weights[i] > 0]
        if not holders:
            means.append(None)
            continue
        total = sum(weights[i] for i in holders)
        means.append(sum(values[i][t].double() * weights[i] for i in holders) / total)
    return [
        [
            means[t].to(values[i][t].dtype) if means[t] is not None and t in masks[i].needs else values[i][t].clone()
            for t in range(num_tensors)
        ]
        for i in range(len(values))
    ]


def _placeholder(**fields: Any) -> averaging_pb2.AveragingData:
    """An empty part: "I hold nothing here" from a sender, "keep your value" from a reducer."""
    return averaging_pb2.AveragingData(tensor_part=runtime_pb2.Tensor(), **fields)


def _is_placeholder(message: averaging_pb2.AveragingData) -> bool:
    return len(message.tensor_part.size) == 0 and not message.tensor_part.buffer


class _CountingReducer(TensorPartReducer):
    """hivemind's reducer that also remembers each part's total weight, so "nobody held it" is known exactly."""

    def __init__(self, part_shapes: Sequence[torch.Size], num_senders: int) -> None:
        self.denominators: list[float] = [0.0] * len(part_shapes)
        super().__init__(part_shapes, num_senders)

    def check_current_part_finished(self) -> None:
        if self.current_part_accumulated_from == self.num_current_senders:
            self.denominators[self.current_part_index] = self.denominator
            if self.denominator == 0:
                self.denominator = 1.0  # avoid 0/0: the result is discarded (every member keeps its value)
        super().check_current_part_finished()


class HolderAllReduceRunner(AllReduceRunner):
    """hivemind's butterfly all-reduce where each member sends only what it holds and receives only what it needs.

    ``masks`` are the group members' :class:`HolderMasks`, in ``ordered_peer_ids`` order; ``count_bytes`` is called
    with the serialized size of every message this peer sends. See the module docstring for the protocol.
    """

    def __init__(
        self, *, masks: Sequence[HolderMasks], count_bytes: Callable[[int], None] = lambda n: None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if len(masks) != len(self.ordered_peer_ids):
            raise AllreduceException(f"got {len(masks)} holder masks for a group of {len(self.ordered_peer_ids)}")
        self.masks = effective_masks(masks)
        self.count_bytes = count_bytes
        replaced = self.tensor_part_reducer
        replaced.finished.set()  # never used: keep its finalizer from reporting "received 0% of input tensors"
        self.tensor_part_reducer = _CountingReducer(replaced.part_shapes, replaced.num_senders)
        container = self.tensor_part_container
        part_tensor = [t for t, count in enumerate(container.num_parts_by_tensor) for _ in range(count)]
        first = 0
        self.part_tensor_by_peer: list[list[int]] = []  # for each reducer, the tensor index of each of its parts
        for count in container.num_parts_by_peer:
            self.part_tensor_by_peer.append(part_tensor[first:first + count])
            first += count
        self.my_index = self.ordered_peer_ids.index(self.peer_id)
        self.my_masks = self.masks[self.my_index]

    def _sender_masks(self, sender_index: int) -> HolderMasks:
        return self.masks[self.ordered_peer_ids.index(self.sender_peer_ids[sender_index])]

    def _reply(self, part_index: int, averaged: torch.Tensor, receiver: HolderMasks) -> averaging_pb2.AveragingData:
        """The reducer's answer for one part: the mean if the receiver needs it and somebody held it, else nothing."""
        tensor = self.part_tensor_by_peer[self.my_index][part_index]
        if tensor in receiver.needs and self.tensor_part_reducer.denominators[part_index] > 0:
            container = self.tensor_part_container
            info = container._input_parts_by_peer[self.my_index][part_index][1]
            serialized = container.compression.compress(averaged, info)  # the run's wire format, as for any part
            return averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART, tensor_part=serialized)
        return _placeholder(code=averaging_pb2.AVERAGED_PART)

    async def _communicate_with_peer(self, peer_id: PeerID) -> None:
        peer_index = self.ordered_peer_ids.index(peer_id)
        container = self.tensor_part_container
        my_parts = [part for part, _ in container._input_parts_by_peer[peer_index]]
        tensors = self.part_tensor_by_peer[peer_index]
        if peer_id == self.peer_id:
            sender_index = self.sender_peer_ids.index(peer_id)
            for part_index, part in enumerate(self.parts_for_local_averaging):
                held = tensors[part_index] in self.my_masks.sends
                averaged = await self.tensor_part_reducer.accumulate_part(
                    sender_index, part_index, part if held else torch.zeros_like(part), weight=self.weight if held else 0.0
                )
                wanted = tensors[part_index] in self.my_masks.needs
                have_mean = self.tensor_part_reducer.denominators[part_index] > 0
                delta = averaged - part if wanted and have_mean else torch.zeros_like(part)
                container.register_processed_part(peer_index, part_index, delta)
            return
        try:
            done_sending = asyncio.Event()
            inputs_aiter = attach_event_on_finished(self._generate_input_for_peer(peer_index), done_sending)
            stream = await self._get_peer_stub(peer_id).rpc_aggregate_part(inputs_aiter)
            if self.should_delay_results(self.peer_id):
                await done_sending.wait()

            def _delta(message: averaging_pb2.AveragingData, part_index: int) -> torch.Tensor:
                if message.code != averaging_pb2.AVERAGED_PART:
                    raise AllreduceException(f"{peer_id} sent {averaging_pb2.MessageCode.Name(message.code)}")
                if _is_placeholder(message):
                    return torch.zeros_like(my_parts[part_index])
                return deserialize_torch_tensor(message.tensor_part) - my_parts[part_index]

            part_index = 0
            async for message in aiter_with_timeout(stream, self.reducer_timeout):
                container.register_processed_part(peer_index, part_index, _delta(message, part_index))
                part_index += 1
            if part_index != container.num_parts_by_peer[peer_index]:
                raise AllreduceException(
                    f"peer {peer_id} sent {part_index} parts, but we expected {container.num_parts_by_peer[peer_index]}"
                )
        except BaseException as error:
            if isinstance(error, Exception):
                log.debug(f"Caught {error!r} when communicating to {peer_id}", exc_info=True)
            container.register_failed_reducer(peer_index)
            raise

    async def _generate_input_for_peer(self, peer_index: int) -> AsyncIterator[averaging_pb2.AveragingData]:
        container = self.tensor_part_container
        container._inputs_consumed_by_peer[peer_index] = True
        tensors = self.part_tensor_by_peer[peer_index]
        loop = asyncio.get_event_loop()
        for part_index, (part, info) in enumerate(container._input_parts_by_peer[peer_index]):
            first = dict(code=averaging_pb2.PART_FOR_AVERAGING, group_id=self.group_id) if part_index == 0 else {}
            if tensors[part_index] in self.my_masks.sends:
                serialized = await loop.run_in_executor(None, container.compression.compress, part, info)
                message = averaging_pb2.AveragingData(tensor_part=serialized, weight=self.weight, **first)
            else:
                message = _placeholder(weight=0.0, **first)
            self.count_bytes(message.ByteSize())
            yield message

    async def _accumulate_parts_streaming(
        self, stream: AsyncIterator[averaging_pb2.AveragingData], sender_index: int
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        part_index = 0
        receiver = self._sender_masks(sender_index)
        shapes = self.tensor_part_reducer.part_shapes
        try:
            async for message in stream:
                if _is_placeholder(message):
                    part, weight = torch.zeros(shapes[part_index]), 0.0
                else:
                    part, weight = deserialize_torch_tensor(message.tensor_part), message.weight
                try:
                    averaged = await self.tensor_part_reducer.accumulate_part(sender_index, part_index, part, weight)
                except BannedException:
                    log.debug(f"Sender {sender_index} is already banned")
                    break
                reply = self._reply(part_index, averaged, receiver)
                part_index += 1
                self.count_bytes(reply.ByteSize())
                yield reply
        finally:
            if part_index != self.tensor_part_reducer.num_parts:
                await self._ban_sender(self.sender_peer_ids[sender_index])

    async def rpc_aggregate_part(
        self, stream: AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        async for message in super().rpc_aggregate_part(stream, context):
            if message.code != averaging_pb2.AVERAGED_PART:
                self.count_bytes(message.ByteSize())  # error codes; parts were counted where they were made
            yield message


class HolderAverager(DecentralizedAverager):
    """A hivemind ``DecentralizedAverager`` whose rounds are holder-weighted (see the module docstring).

    It takes ``DecentralizedAverager``'s arguments. Call :meth:`average` with this peer's :class:`HolderMasks` instead
    of ``step``: the masks travel to the group through hivemind's all-gather. Every member of a run must use this
    class (its RPC namespace differs from plain averagers, so they never share a group).

    Example (two processes, the same code)::

        averager = HolderAverager([torch.zeros(3), torch.zeros(2)], dht, prefix="run_resist", start=True)
        group = averager.average(HolderMasks(sends=frozenset({0}), needs=frozenset({0, 1})), timeout=30)
    """

    def __init__(self, averaged_tensors: Sequence[torch.Tensor], *args: Any, **kwargs: Any) -> None:
        self._bytes_sent = mp.Value(ctypes.c_double, 0.0)  # shared with the averager process, which sends
        self.num_tensors = len(averaged_tensors)
        super().__init__(averaged_tensors, *args, **kwargs)

    @property
    def bytes_sent(self) -> float:
        """Bytes of all-reduce messages this peer has sent so far (parts, replies and placeholders)."""
        return self._bytes_sent.value

    def _count_bytes(self, size: int) -> None:
        with self._bytes_sent.get_lock():
            self._bytes_sent.value += size

    def average(self, masks: HolderMasks, timeout: float, weight: float = 1.0) -> int:
        """One holder-weighted round; returns the size of the group that averaged (0 if none formed or it failed).

        The tensors are updated in place (use ``get_tensors()`` to read them). A failed round changes nothing.
        """
        if any(not 0 <= i < self.num_tensors for i in masks.sends | masks.needs):
            raise ValueError(f"`masks` index tensors outside range({self.num_tensors}): {masks}")
        try:
            gathered = self.step(gather=masks.to_record(), weight=weight, timeout=timeout, wait=True)
        except Exception as error:  # hivemind raises on some failures and returns None on others
            log.info(f"Holder-weighted round failed: {type(error).__name__}: {error}")
            return 0
        return len(gathered) if gathered else 0

    async def _aggregate_with_group(self, group_info: GroupInfo, min_vector_size: int, **kwargs: Any) -> Any:
        # hivemind 1.1.12 DecentralizedAverager._aggregate_with_group, with the members' masks handed to the runner
        try:
            bandwidths, mode_ids, user_gathered_bytes = zip(*map(self.serializer.loads, group_info.gathered))
            user_gathered = dict(zip(group_info.peer_ids, map(self.serializer.loads, user_gathered_bytes)))
            masks = [HolderMasks.from_record(user_gathered[peer_id]) for peer_id in group_info.peer_ids]
            modes = tuple(map(AveragingMode, mode_ids))
            download_bandwidths = [thr if mode != AveragingMode.CLIENT else 0.0 for thr, mode in zip(bandwidths, modes)]
            peer_fractions = await asyncio.get_event_loop().run_in_executor(
                None, load_balance_peers, self.total_size, download_bandwidths, min_vector_size
            )
            async with enter_asynchronously(self.get_tensors()) as local_tensors:
                await self._run_holder_allreduce(local_tensors, group_info, masks, peer_fractions=peer_fractions,
                                                 **kwargs)  # fmt: skip
                return user_gathered
        except BaseException as error:
            if isinstance(error, Exception):
                log.debug(f"Holder-weighted all-reduce failed: {error!r}")
            raise MatchmakingException(f"Unable to run All-Reduce: {error}") from error

    async def _run_holder_allreduce(
        self, tensors: Sequence[torch.Tensor], group_info: GroupInfo, masks: Sequence[HolderMasks], **kwargs: Any
    ) -> None:
        # hivemind 1.1.12 DecentralizedAverager._run_allreduce_inplace_, with our runner
        runner = HolderAllReduceRunner(
            masks=masks,
            count_bytes=self._count_bytes,
            p2p=self._p2p,
            servicer_type=type(self),
            prefix=self.prefix,
            tensors=tensors,
            group_id=group_info.group_id,
            ordered_peer_ids=group_info.peer_ids,
            **kwargs,
        )
        self._running_groups[group_info.group_id].set_result(runner)
        if runner.modes[group_info.peer_ids.index(self.peer_id)] != AveragingMode.AUX:
            async for tensor, update in azip(as_aiter(*tensors), runner):
                tensor.add_(update, alpha=self._averaging_alpha)
                self.last_updated = get_dht_time()
                self._state_updated.set()
        else:
            async for _ in runner:
                raise ValueError("aux peers should not receive averaged tensors")


def tensor_indices(groups: Iterable[Iterable[int]]) -> frozenset[int]:
    """The union of several index groups, as a mask."""
    return frozenset(i for group in groups for i in group)
