"""Byzantine-tolerant reduction inside hivemind's butterfly all-reduce (BTARD's "ButterflyClip").

**How hivemind averages.** In a group of n peers, hivemind's ``AllReduceRunner`` cuts the flat vector of all averaged
tensors into n contiguous pieces, one per peer. Every peer sends piece k to peer k; peer k *reduces* it with a
``TensorPartReducer``, which sums the parts it receives weighted by each sender's weight and divides, then sends the
result back. Each peer therefore does O(vector size) work whatever n is.

**What changes here.** :class:`CenteredClipReducer` keeps each sender's part instead of summing it, and once every
live sender has delivered, reduces them with :func:`lightning_moshpit.clipping.centered_clip`. The butterfly, the
wire format, timeouts and bans stay hivemind's; only the arithmetic of each piece changes, so the cost stays
O(n · vector size / n) per peer per iteration. A piece is hivemind's part (at most 2^19 bytes): the clipping radius
applies to each part's own distance, as in BTARD.

**How it is hooked in.** :class:`CenteredClipAveragerMixin` overrides the one method of ``DecentralizedAverager``
that builds the ``AllReduceRunner`` (a private hook; hivemind is pinned to ``>=1.1.12,<1.2`` and tests cover it) so
that it builds :class:`ClippedAllReduceRunner`. :func:`gradient_averager_factory` and
:class:`ClippedTrainingStateAverager` apply it to gradient rounds and to parameter (state) rounds: a NaN or wild
parameter vector from one peer must not spread through state averaging either.

Every reducer must use the same rule: the piece a peer reduces is reduced by *that* peer's code. Averagers with
``aggregation="centered_clip"`` therefore use their own DHT prefix, so they never form a group with ``"mean"`` ones.

**Groups of two are refused.** With two senders no rule can tell the honest vector from the bad one (the median of two
is their mean), and on a busy machine hivemind often splits four peers into groups of two and three: measured here,
one attacker then wrecked the run despite CenteredClip. Clipping averagers therefore ask hivemind's matchmaking for
at least :data:`MIN_SENDERS` members (``min_group_size``), and a runner whose group has fewer senders (a leader that
ignored the minimum) fails the round instead of reducing: the peer then steps with its own gradients, as after any
failed round.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from collections.abc import Sequence
from typing import Any, Callable, Optional

import torch
from hivemind.averaging.allreduce import AllReduceRunner, AveragingMode
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.partition import AllreduceException, BannedException, TensorPartReducer
from hivemind.optim.grad_averager import GradientAverager
from hivemind.optim.state_averager import TrainingStateAverager
from hivemind.utils import as_aiter, get_dht_time
from hivemind.utils.asyncio import azip

from lightning_moshpit.clipping import DEFAULT_CLIP_ITERS, DEFAULT_DROP_FACTOR, DEFAULT_TOLERANCE, centered_clip
from lightning_moshpit.security import (
    PrivateAveragerMixin,
    PrivateGradientAverager,
    PrivateTrainingStateAverager,
    SwarmSecret,
)

log = logging.getLogger(__name__)

#: Appended to the DHT prefix of ``aggregation="centered_clip"`` averagers (see :attr:`ClipConfig.prefix_suffix`).
CLIP_PREFIX_SUFFIX = "_centered_clip"
#: The values ``MoshpitStrategy(aggregation=...)`` accepts.
AGGREGATION_NAMES = ("mean", "centered_clip")
#: Fewest senders a CenteredClip group reduces with: with two, the median is the mean and an attacker wins.
MIN_SENDERS = 3


@dataclasses.dataclass(frozen=True)
class ClipConfig:
    """CenteredClip settings shared by every reducer of a peer (see :func:`lightning_moshpit.clipping.centered_clip`).

    ``tau=None`` is the adaptive radius (the median distance of the parts to their coordinate-wise median);
    ``drop_factor`` rejects parts farther than that many radii from the clipped result (``None``: clip only).
    """

    tau: Optional[float] = None
    iterations: int = DEFAULT_CLIP_ITERS
    tolerance: float = DEFAULT_TOLERANCE
    drop_factor: Optional[float] = DEFAULT_DROP_FACTOR

    @property
    def prefix_suffix(self) -> str:
        """Appended to an averager's DHT prefix so that clipping and averaging peers never share a group."""
        return CLIP_PREFIX_SUFFIX


def check_aggregation(
    aggregation: Any, clip_tau: Any, clip_iters: Any, clip_drop: Any = DEFAULT_DROP_FACTOR
) -> Optional[ClipConfig]:
    """Validate ``MoshpitStrategy``'s aggregation arguments; returns the clip settings, or ``None`` for the mean."""
    if not isinstance(aggregation, str) or aggregation not in AGGREGATION_NAMES:
        raise ValueError(f"`aggregation` must be one of {list(AGGREGATION_NAMES)}, got {aggregation!r}")
    if clip_tau is not None and (
        isinstance(clip_tau, bool) or not isinstance(clip_tau, (int, float)) or not (math.isfinite(clip_tau) and clip_tau > 0)
    ):
        raise ValueError(
            f"`clip_tau` must be a positive finite number (the clipping radius) or None (adaptive radius), "
            f"got {clip_tau!r}"
        )
    if isinstance(clip_iters, bool) or not isinstance(clip_iters, int) or clip_iters < 1:
        raise ValueError(f"`clip_iters` must be a positive integer (CenteredClip iterations), got {clip_iters!r}")
    if clip_drop is not None and (
        isinstance(clip_drop, bool) or not isinstance(clip_drop, (int, float)) or not (math.isfinite(clip_drop) and clip_drop > 1)
    ):
        raise ValueError(
            f"`clip_drop` must be a finite number > 1 (reject members farther than this many clipping radii) or None "
            f"(clip only, never reject), got {clip_drop!r}"
        )
    if aggregation == "mean":
        return None
    return ClipConfig(tau=None if clip_tau is None else float(clip_tau), iterations=clip_iters,
                      drop_factor=None if clip_drop is None else float(clip_drop))  # fmt: skip


class CenteredClipReducer(TensorPartReducer):
    """A ``TensorPartReducer`` that reduces each part by CenteredClip over the senders' parts instead of their mean.

    hivemind's reducer adds every incoming part to one accumulator. This one keeps the parts of the current piece (one
    per sender, so memory is n × part size) and reduces them when the last live sender has delivered or was banned.
    A sender flagged as an outlier (clipped far away, rejected beyond ``drop_factor · τ``, or dropped for NaN/inf) is
    logged with its peer id: once as a warning,
    later at debug level.
    """

    def __init__(
        self,
        part_shapes: Sequence[torch.Size],
        num_senders: int,
        clip: ClipConfig,
        sender_names: Optional[Sequence[str]] = None,
        round_name: str = "",
    ) -> None:
        self.clip = clip
        self.round_name = round_name  # the averager's DHT prefix, e.g. "<run_id>_grad_averager_centered_clip"
        self.sender_names = list(sender_names) if sender_names is not None else [str(i) for i in range(num_senders)]
        self._parts: list[torch.Tensor] = []
        self._weights: list[float] = []
        self._senders: list[int] = []
        super().__init__(part_shapes, num_senders)

    def reset_accumulators(self) -> None:
        self._parts, self._weights, self._senders = [], [], []
        super().reset_accumulators()
        self.accumulator = None  # hivemind's running sum is not used: the parts are kept instead

    async def accumulate_part(
        self, sender_index: int, part_index: int, tensor_part: torch.Tensor, weight: float = 1.0
    ) -> torch.Tensor:
        """Keep this sender's part, wait until every live sender's part of this piece is in, return the reduction.

        The bookkeeping (waiting for earlier pieces, bans) is hivemind's ``TensorPartReducer.accumulate_part``; only
        the accumulation differs.
        """
        assert 0 <= sender_index < self.num_senders, "invalid sender index"
        assert 0 <= part_index < self.num_parts, "invalid part index"
        self.num_parts_received[sender_index] += 1
        while part_index > self.current_part_index:
            await asyncio.wait(
                {self.current_part_future, asyncio.create_task(self.finished.wait())},
                return_when=asyncio.FIRST_COMPLETED,
            )
            if self.finished.is_set():
                raise AllreduceException(f"attempted to aggregate part in a finalized {self.__class__.__name__}")
        if self.sender_failed_after[sender_index] != float("inf"):
            raise BannedException(f"sender {sender_index} was banned in background")
        assert part_index == self.current_part_index
        current_part_future = self.current_part_future
        if part_index < self.sender_failed_after[sender_index]:
            self._parts.append(tensor_part)
            self._weights.append(float(weight))
            self._senders.append(sender_index)
            self.current_part_accumulated_from += 1
            self.denominator += weight
            self.check_current_part_finished()
        return await current_part_future

    def check_current_part_finished(self) -> None:
        assert self.current_part_accumulated_from <= self.num_current_senders
        if self.current_part_accumulated_from == self.num_current_senders:
            self.current_part_future.set_result(self._reduce())
            self.reset_accumulators()

    def _reduce(self) -> torch.Tensor:
        shape = self.part_shapes[self.current_part_index]
        if not self._parts:
            return torch.zeros(shape)
        result = centered_clip(
            [part.reshape(shape).float() for part in self._parts],
            weights=self._weights,
            tau=self.clip.tau,
            iterations=self.clip.iterations,
            tolerance=self.clip.tolerance,
            drop_factor=self.clip.drop_factor,
        )
        for position in result.dropped:
            self._flag(position, "sent NaN/inf values; its part was left out of the average")
        for position in result.rejected:
            self._flag(position, f"sent a part {result.distances[position]:.3g} away from the robust average, more than "
                                 f"{self.clip.drop_factor:g} x the radius τ={result.tau:.3g}; its part was left out of "
                                 f"the average")  # fmt: skip
        for position in result.clipped:
            distance = result.distances[position]
            if distance > 10 * result.tau:  # honest parts sit near τ by construction; report clear outliers only
                self._flag(position, f"sent a part {distance:.3g} away from the robust average (radius τ={result.tau:.3g}); "
                                     f"its pull was clipped to τ")  # fmt: skip
        return result.value

    _flagged: set[tuple[str, str]] = set()  # per process: warn once per sender and averager, then log at debug level

    def _flag(self, position: int, what: str) -> None:
        name = self.sender_names[self._senders[position]]
        level = logging.DEBUG if (self.round_name, name) in CenteredClipReducer._flagged else logging.WARNING
        CenteredClipReducer._flagged.add((self.round_name, name))
        where = f" [{self.round_name}]" if self.round_name else ""
        log.log(level, f"CenteredClip: peer {name} {what}{where}")


class ClippedAllReduceRunner(AllReduceRunner):
    """hivemind's ``AllReduceRunner`` whose reducer is a :class:`CenteredClipReducer`."""

    def __init__(self, *, clip: ClipConfig, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        replaced = self.tensor_part_reducer
        if 0 < len(self.sender_peer_ids) < MIN_SENDERS:
            replaced.finished.set()
            raise AllreduceException(
                f"CenteredClip needs at least {MIN_SENDERS} senders per group, got {len(self.sender_peer_ids)}: "
                f"with two, an attacker cannot be told apart; skipping this round"
            )
        replaced.finished.set()  # never used: keep its finalizer from reporting "received 0% of input tensors"
        self.tensor_part_reducer = CenteredClipReducer(
            replaced.part_shapes,
            replaced.num_senders,
            clip=clip,
            sender_names=[peer_id.to_base58() for peer_id in self.sender_peer_ids],
            round_name=kwargs.get("prefix") or "",
        )


class CenteredClipAveragerMixin:
    """Mix into a hivemind ``DecentralizedAverager`` subclass to reduce its all-reduce rounds by CenteredClip.

    Set :attr:`clip` before ``DecentralizedAverager.__init__`` runs: with ``start=True`` the averager process forks
    inside it and keeps the attributes it had then.
    """

    clip: ClipConfig

    async def _run_allreduce_inplace_(
        self, tensors: Sequence[torch.Tensor], group_info: GroupInfo, group_id: Optional[bytes] = None, **kwargs: Any
    ) -> None:
        # hivemind 1.1.12 DecentralizedAverager._run_allreduce_inplace_, with the runner class swapped
        averager: Any = self
        group_id = group_info.group_id if group_id is None else group_id
        runner = ClippedAllReduceRunner(
            clip=self.clip,
            p2p=averager._p2p,
            servicer_type=type(self),
            prefix=averager.prefix,
            tensors=tensors,
            group_id=group_id,
            ordered_peer_ids=group_info.peer_ids,
            **kwargs,
        )
        assert group_id in averager._running_groups, f"Group id {group_id} was not registered in _register_allreduce_group"
        averager._running_groups[group_id].set_result(runner)
        if runner.modes[group_info.peer_ids.index(averager.peer_id)] != AveragingMode.AUX:
            async for tensor, update in azip(as_aiter(*tensors), runner):
                tensor.add_(update, alpha=averager._averaging_alpha)
                averager.last_updated = get_dht_time()
                averager._state_updated.set()
        else:
            async for _ in runner:
                raise ValueError("aux peers should not receive averaged tensors")


class ClippedGradientAverager(CenteredClipAveragerMixin, GradientAverager):
    """hivemind's ``GradientAverager`` reducing gradients by CenteredClip (``aggregation="centered_clip"``)."""

    def __init__(self, *args: Any, clip: ClipConfig, prefix: str, **kwargs: Any) -> None:
        self.clip = clip
        kwargs["min_group_size"] = max(MIN_SENDERS, kwargs.get("min_group_size", MIN_SENDERS))
        super().__init__(*args, prefix=prefix + clip.prefix_suffix, **kwargs)


class ClippedTrainingStateAverager(CenteredClipAveragerMixin, TrainingStateAverager):
    """hivemind's ``TrainingStateAverager`` reducing parameters and statistics by CenteredClip."""

    def __init__(self, *args: Any, clip: ClipConfig, prefix: str, **kwargs: Any) -> None:
        self.clip = clip
        kwargs["min_group_size"] = max(MIN_SENDERS, kwargs.get("min_group_size", MIN_SENDERS))
        super().__init__(*args, prefix=prefix + clip.prefix_suffix, **kwargs)


class ClippedPrivateGradientAverager(ClippedGradientAverager, PrivateAveragerMixin):
    """CenteredClip gradient averaging in a private swarm: both mixins compose (clipping swaps the all-reduce runner,
    the private mixin checks the secret in matchmaking). RPC handlers keep the name ``ClippedGradientAverager``."""

    _rpc_handlers = None  # collect this class's own handlers and stub
    _stub_type = None


class ClippedPrivateTrainingStateAverager(ClippedTrainingStateAverager, PrivateAveragerMixin):
    """CenteredClip state averaging in a private swarm (see :class:`ClippedPrivateGradientAverager`)."""

    _rpc_handlers = None
    _stub_type = None


def gradient_averager_factory(
    clip: Optional[ClipConfig], swarm_secret: Optional[SwarmSecret] = None, **averager_opts: Any
) -> Callable[..., GradientAverager]:
    """The ``grad_averager_factory`` for ``hivemind.Optimizer``: the mean (``clip=None``) or CenteredClip, in an open
    swarm (``swarm_secret=None``) or a private one."""
    opts = dict(averager_opts)
    if swarm_secret is not None:
        opts["swarm_secret"] = swarm_secret
    if clip is None:
        return _Factory(GradientAverager if swarm_secret is None else PrivateGradientAverager, opts)
    return _Factory(ClippedGradientAverager if swarm_secret is None else ClippedPrivateGradientAverager,
                    {**opts, "clip": clip})  # fmt: skip


def state_averager_class(clip: Optional[ClipConfig], swarm_secret: Optional[SwarmSecret]) -> type:
    """The ``TrainingStateAverager`` class for these settings (``SwarmOptimizer`` passes ``clip``/``swarm_secret``)."""
    if clip is None:
        return TrainingStateAverager if swarm_secret is None else PrivateTrainingStateAverager
    return ClippedTrainingStateAverager if swarm_secret is None else ClippedPrivateTrainingStateAverager


@dataclasses.dataclass(frozen=True)
class _Factory:
    """A picklable ``functools.partial`` look-alike that shows its class in reprs and error messages."""

    cls: type
    kwargs: dict

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.cls(*args, **{**self.kwargs, **kwargs})
