"""``SwarmOptimizer``: hivemind's collaborative ``Optimizer`` with the fixes that make small swarms average every round.

Why a subclass? Stock ``hivemind.Optimizer`` 1.1.x loses most gradient-averaging rounds on small swarms (see
``docs/concepts.md``, "Why stock hivemind loses rounds"). In short:

1. A new peer publishes its progress only once it has accumulated samples, so at start-up every peer believes it is
   alone and races through "solo" epochs.
2. On each solo epoch the optimizer *pre-schedules* an averaging round and cancels it at once. The averager cancels
   its matchmaking task without awaiting it; the orphaned cleanup leaves the gradient averager unable to declare
   itself in the DHT again, so every later round fails with "could not find a group".

The fixes, kept in our layer and pinned to ``hivemind>=1.1.12,<1.2`` (the hooks below are private):

- **No solo scheduling** (always on): ``_maybe_schedule_gradient_averaging`` / ``_maybe_schedule_state_averaging``
  do nothing while the progress tracker sees at most one peer, so no round is ever booked and cancelled.
- **Start barrier** (:meth:`SwarmOptimizer.join_swarm`): publish this peer's presence right away, wait until at least
  ``min_peers`` are visible (or a timeout passes), load the swarm's state if it is ahead, and place this peer on the
  Moshpit grid.
- **Round bookkeeping**: every gradient-averaging round is recorded (:class:`AveragingRound`) with the size of the
  group it formed and the number of peers the tracker saw, so "share of rounds that included every peer" is
  measurable. A peer whose rounds keep failing while others are visible moves to a fresh random group key.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import threading
import time
from typing import Any, Callable, Optional

import hivemind
import torch
from hivemind.averaging.control import StepControl
from hivemind.optim.progress_tracker import LocalTrainingProgress, ProgressTracker
from hivemind.optim.state_averager import TrainingStateAverager
from hivemind.p2p import PeerID
from hivemind.utils import ValueWithExpiration, get_dht_time

from lightning_moshpit.averaging import grid_bucket, grid_group_bits, key_length, random_group_bits, round_key
from lightning_moshpit.consistent_state import FINAL_ROUND, consistent
from lightning_moshpit.guards import ModelSignature, nonfinite_gradients
from lightning_moshpit.hivemind_logs import PartialRoundCounter, quiet_expected_round_failures
from lightning_moshpit.matchmaking import set_target_group_size
from lightning_moshpit.reducers import ClipConfig, state_averager_class
from lightning_moshpit.security import SwarmSecret, implausible_progress

log = logging.getLogger(__name__)

#: After this many failed rounds in a row while other peers are visible, the averager is moved to a new group key.
WEDGED_AFTER_FAILURES = 3
#: Failed state downloads in a row after which :meth:`SwarmOptimizer.load_state_from_peers` raises.
LOAD_STATE_ATTEMPTS = 3


@dataclasses.dataclass(frozen=True)
class AveragingRound:
    """One gradient-averaging attempt, as seen by this peer."""

    epoch: int  #: the global step (hivemind epoch) this round belongs to
    group_size: int  #: peers in the group that averaged (0 if the round failed)
    swarm_size: int  #: peers the progress tracker saw when the round ended (this peer included)
    succeeded: bool
    time: float  #: wall-clock time (``time.time()``) when the round ended
    #: seconds from this peer's trigger (its samples reached the target) until the averaged gradients were loaded:
    #: what is left of matchmaking, the all-reduce, and loading. Blocks training unless delay_parameter_updates is on.
    seconds: float = 0.0
    #: this peer's averagers logged a partial all-reduce (a member sent nothing) since the previous record: in this
    #: round, or in a background parameter round since. hivemind reports such a round as a success; it is a failure.
    partial: bool = False
    #: the group this round waited for: the live swarm, or on a grid the live peers of this peer's bucket (0: not
    #: known, e.g. under delayed parameter updates, which keep hivemind's group assembly)
    wanted: int = 0


#: Weight in a final round of a peer that has not yet been in one with others (see average_final_state): small
#: enough that a latecomer does not move the agreed parameters (error 1e-6 x the difference), not zero (hivemind
#: divides by the weights' sum, and a round of latecomers only must still average).
UNAGREED_WEIGHT = 1e-6
#: Key of the ``gather`` payload of a gradient round: the global step whose gradients the member sends.
STEP_OF_ROUND = "moshpit_step"


class SwarmProgressTracker(ProgressTracker):
    """hivemind's ProgressTracker with a sample count that does not lag behind the swarm.

    Stock hivemind decides that the swarm reached ``target_batch_size`` from the DHT records it fetched last, plus
    this peer's own samples since. Two things make that count lag, and each lag makes the swarm overshoot the target
    (measured here: about 2-3x with 3 peers whose global step lasts less than a refresh period):

    - on every refresh it replaces its view with the DHT records, *including its own*, which lags behind the
      asynchronous store; we substitute the live local record;
    - between refreshes it ignores what the other peers have done since their last report; we extrapolate each
      peer's count with the throughput it reported, as hivemind already does for its ETA estimate.

    It also ignores (with a warning naming the peer) records whose claims cannot be true, e.g. 10**9 samples toward
    one step: see :func:`lightning_moshpit.security.implausible_progress`. Without that, one such record made every
    peer take an optimizer step at its next refresh.

    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._others: list[tuple[int, float, float]] = []  # (samples, report time, samples/s) of current-epoch peers
        self.last_fetch_time = time.time()  #: wall-clock time of the last swarm-progress fetch (stale after a pause)
        self.implausible_records = 0  #: progress records ignored because their claims exceed the plausibility bound
        self._warned_implausible: dict[bytes, int] = {}  # peer id -> epoch of the last warning about it
        #: peer ids of the live swarm as of the last fetch (this peer's included), sorted: the common order of grid
        #: positions (see SwarmOptimizer._enter_grid_bucket)
        self.live_peer_ids: list[bytes] = []
        super().__init__(*args, **kwargs)

    def run(self) -> None:
        """hivemind's ``ProgressTracker.run``, then finish the loop's leftover tasks before the thread ends.

        hivemind leaves two helper tasks behind (the fetcher's shutdown checker, the reporter's last store); their
        event loop was dropped with them still pending, and Python printed "Task was destroyed but it is pending!" at
        every exit.
        """
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        loop.set_exception_handler(self._report_store_timeouts_in_one_line)
        try:
            loop.run_until_complete(asyncio.gather(self._progress_reporter(), self._progress_fetcher()))
            leftovers = asyncio.all_tasks(loop)
            for task in leftovers:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))
        finally:
            loop.close()
            self.shutdown_complete.set()

    def _report_store_timeouts_in_one_line(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        """hivemind's reporter stores each progress record in a task it never awaits; a store that timed out (the DHT
        was overloaded, e.g. 8 peers starting at once on 2 cores) was printed as "Task exception was never
        retrieved" plus two tracebacks. The next report replaces the record, so one line says it; anything else
        goes to asyncio's default handler."""
        if isinstance(context.get("exception"), asyncio.TimeoutError) and "never retrieved" in context.get("message", ""):
            log.warning(f"A progress report to the DHT timed out after {self.metadata_expiration:.0f} s (the DHT is "
                        f"overloaded or unreachable); the next report replaces it")  # fmt: skip
            return
        loop.default_exception_handler(context)

    def plausible(self, record: Any) -> bool:
        """Whether a raw progress record (a dict, as stored in the DHT) is well-formed and within the bound."""
        try:
            return self._plausible(LocalTrainingProgress.parse_obj(record))
        except Exception:  # pydantic's ValidationError, or not a mapping at all
            return False

    def _plausible(self, progress: LocalTrainingProgress) -> bool:
        problem = implausible_progress(progress.samples_accumulated, progress.samples_per_second, self.target_batch_size)
        if problem is None:
            return True
        self.implausible_records += 1
        if self._warned_implausible.get(progress.peer_id) != progress.epoch:
            self._warned_implausible[progress.peer_id] = progress.epoch
            log.warning(f"Ignored the progress record of peer {PeerID(progress.peer_id).to_base58()} at global step "
                        f"{progress.epoch}: it {problem} (target_batch_size={self.target_batch_size})")  # fmt: skip
        return False

    def _parse_swarm_progress_data(self, metadata: Any) -> Any:
        self.last_fetch_time = time.time()
        own = self.local_progress
        others: list[LocalTrainingProgress] = []
        if isinstance(metadata, dict) and metadata:
            for record in metadata.values():
                value = getattr(record, "value", None)
                if isinstance(value, dict) and value.get("peer_id") != own.peer_id:
                    record = LocalTrainingProgress.parse_obj(value)
                    if self._plausible(record):
                        # hivemind extrapolates a record by (now - its time) x its samples/s, unbounded: a record dated
                        # far in the past would count as any number of samples. Extrapolate by at most the horizon.
                        oldest = get_dht_time() - self.max_refresh_period
                        others.append(record.copy(update={"time": max(record.time, oldest)}))
            metadata = {subkey: ValueWithExpiration(p.dict(), float("inf")) for subkey, p in enumerate(others)}
            metadata["self"] = ValueWithExpiration(own.dict(), float("inf"))
        progress = super()._parse_swarm_progress_data(metadata)
        self.live_peer_ids = sorted({own.peer_id, *(p.peer_id for p in others)})
        self._others = [
            (p.samples_accumulated, p.time, p.samples_per_second) for p in others if p.epoch == progress.epoch
        ]
        return progress

    @property
    def estimated_samples_accumulated(self) -> float:
        """This peer's exact count plus every other peer's last report extrapolated to now by its throughput."""
        now, horizon = get_dht_time(), self.max_refresh_period
        # Extrapolate only peers that have started this global step (a peer at 0 samples is usually still busy with
        # the previous optimizer step), and by at most one refresh period (older: stalled or gone). Extrapolating
        # idle peers counted phantom samples and made 4 peers step ~10% early; not extrapolating made 2 peers step
        # ~15% late.
        # A record may add at most what is left of the target: a fast peer (hivemind reports its speed on compute
        # time only, so a GPU peer claims thousands of samples/s) is extrapolated to "the target is reached", never
        # beyond, and a record is never rejected for being fast.
        others = sum(
            samples + (min(horizon, max(0.0, now - when)) * speed if samples > 0 else 0.0)
            for samples, when, speed in self._others
        )
        others = min(others, max(self.target_batch_size, sum(samples for samples, _, _ in self._others)))
        own = self.local_progress.samples_accumulated if self.local_progress.epoch == self.global_progress.epoch else 0
        return own + others

    @property
    def ready_to_update_epoch(self) -> bool:
        return super().ready_to_update_epoch or self.estimated_samples_accumulated >= self.target_batch_size


class SwarmOptimizer(hivemind.Optimizer):
    """A ``hivemind.Optimizer`` that never books averaging rounds while alone and records every round.

    It takes exactly ``hivemind.Optimizer``'s arguments; :class:`~lightning_moshpit.MoshpitStrategy` builds it, so
    most users never construct one directly. Extra attributes:

    - :attr:`rounds`: the list of :class:`AveragingRound` this peer took part in;
    - :attr:`batch_size_source`: called after the closure ran, when :meth:`step` gets no ``batch_size``; returns
      the samples processed since the previous step (Lightning runs ``training_step`` *inside* the closure).

    With ``clip`` (a :class:`~lightning_moshpit.reducers.ClipConfig`), parameter (state) rounds are reduced by
    CenteredClip; the strategy passes a matching ``grad_averager_factory`` for gradient rounds.
    """

    def __init__(
        self,
        *,
        group_size: int,
        param_names: Optional[list[str]] = None,
        model_signature: Optional[ModelSignature] = None,
        swarm_secret: Optional[SwarmSecret] = None,
        clip: Optional[ClipConfig] = None,
        **kwargs: Any,
    ) -> None:
        self.swarm_secret = swarm_secret  #: a private swarm's secret: its averagers admit only peers that prove it
        self.group_size = group_size
        self.clip = clip
        self.param_names = param_names
        self.model_signature = model_signature
        self.dropped_batches = 0  #: batches whose non-finite gradients were kept out of the swarm
        self.interrupted = False  #: set by the strategy's SIGINT handler; step() raises KeyboardInterrupt when it is
        self.resyncs = 0  #: times this peer found itself behind after a stale view (e.g. a pause) and reloaded state
        self._signature_published_at = -float("inf")
        self._joined = False  # set once the start barrier is passed
        self.rounds: list[AveragingRound] = []
        self.batch_size_source: Optional[Callable[[], int]] = None
        self.samples_reported = 0  #: samples this peer has contributed through step() since it was created
        self._rounds_lock = threading.Lock()
        self._failures_in_a_row = 0
        self._fruitless_downloads = 0  # state downloads in a row that served nothing (see _count_fruitless_download)
        self._fruitless_since: Optional[float] = None
        self._key_length = 0  # bits in this peer's current grid key (0: the whole swarm is one group)
        self._round_wanted = 0  # the group size the last booked gradient round waited for (0: not known)
        self._resync_requested = False  # a gradient round showed this peer behind: load the state before the next batch
        self._target_group_size: Optional[int] = None  # what the gradient averager assembles at (see matchmaking.py)
        #: the global step at which the run ends (the strategy's ``max_global_steps``): step() never goes past it
        self.stop_at_epoch: Optional[int] = None
        quiet_expected_round_failures()  # before super().__init__ forks the averager processes
        self._partial_rounds = PartialRoundCounter()
        self._partial_rounds.attach()  # inherited by the averager processes forked in super().__init__
        try:
            super().__init__(**kwargs)
        finally:
            self._partial_rounds.detach()
        #: seconds a gradient round waits for the live swarm to join before it starts without the missing peers (see
        #: :meth:`_widen_matchmaking_window`); starts at 2 x matchmaking_time
        self.matchmaking_window = 2 * self.matchmaking_time
        # the state averager is always a ConsistentStateMixin (see _make_state_averager)
        self.state_averager.search_bound = lambda: self.parameter_round_search_seconds

    def _make_progress_tracker(self, target_batch_size: int, **kwargs: Any) -> ProgressTracker:
        return SwarmProgressTracker(
            dht=self.dht,
            prefix=self.run_id,
            target_batch_size=target_batch_size,
            client_mode=self.client_mode,
            status_loglevel=self.status_loglevel,
            start=True,
            **kwargs,
        )

    def _make_state_averager(self, **kwargs: Any) -> TrainingStateAverager:
        # hivemind.Optimizer._make_state_averager (1.1.12) with our class (one that serves consistent states, private
        # and/or CenteredClip as configured): it has no class argument
        extra: dict[str, Any] = {}
        if self.swarm_secret is not None:
            extra["swarm_secret"] = self.swarm_secret
        if self.clip is not None:
            extra["clip"] = self.clip
        return consistent(state_averager_class(self.clip, self.swarm_secret))(
            dht=self.dht,
            prefix=f"{self.run_id}_state_averager",
            min_matchmaking_time=self.matchmaking_time,
            allreduce_timeout=self.allreduce_timeout,
            shutdown_timeout=self.shutdown_timeout,
            offload_optimizer=self.offload_optimizer,
            custom_gradients=self.offload_optimizer,
            status_loglevel=self.status_loglevel,
            next_chunk_timeout=self.next_chunk_timeout,
            client_mode=self.client_mode,
            auxiliary=self.auxiliary,
            start=True,
            **extra,
            **kwargs,
        )

    # ----------------------------------------------------------------------------------------------- swarm start
    @property
    def num_peers(self) -> int:
        """Peers in the swarm as this peer's progress tracker sees them (at least 1: this peer)."""
        return max(1, self.tracker.global_progress.num_peers)

    def announce(self) -> None:
        """Publish this peer's progress record now, even with zero samples (hivemind waits for the first sample)."""
        tracker = self.tracker
        progress = tracker.local_progress
        tracker.dht.store(
            key=tracker.training_progress_key,
            subkey=tracker._local_public_key,  # the same subkey the tracker itself signs its records with
            value=progress.dict(),
            expiration_time=get_dht_time() + tracker.metadata_expiration,
        )

    def visible_peer_ids(self) -> list[bytes]:
        """Peer ids with a live progress record under this run, sorted (used as a common order for grid positions)."""
        found = self.dht.get(self.tracker.training_progress_key, latest=True)
        if found is None or not isinstance(found.value, dict):
            return []
        peer_ids = []
        for record in found.value.values():
            value = getattr(record, "value", None)
            if isinstance(value, dict) and isinstance(value.get("peer_id"), bytes):
                if isinstance(self.tracker, SwarmProgressTracker) and not self.tracker.plausible(value):
                    continue  # a peer that claims impossible progress does not count toward min_peers either
                peer_ids.append(value["peer_id"])
        return sorted(set(peer_ids))

    def refresh_progress(self, timeout: float) -> None:
        """Make the progress tracker fetch the swarm's progress now and wait (up to ``timeout``) until it has."""
        tracker = self.tracker
        tracker.fetched_global_progress_this_epoch.clear()
        tracker.global_progress.next_fetch_time = 0.0
        tracker.global_state_updated.set()
        tracker.fetched_global_progress_this_epoch.wait(timeout)

    def join_swarm(self, min_peers: int, timeout: float, expect_others: bool = False) -> int:
        """The start barrier: announce, wait for ``min_peers`` (up to ``timeout`` s), catch up, take a grid position.

        Returns the number of peers seen. Waiting is bounded: after ``timeout`` the peer starts with whoever is there
        and logs a warning, because a decentralized swarm has no guaranteed size. With ``expect_others`` (the peer
        joined through ``initial_peers``) it also waits up to ``max(5, 2 * matchmaking_time)`` s to see at least one
        other peer: right after bootstrapping, a DHT lookup can miss the records of a running swarm, and a joiner that
        believed it was alone skipped loading the swarm's state.
        """
        self.check_model_signature()  # before announcing: a peer with the wrong model must not count as a member
        self.announce()
        deadline = time.monotonic() + timeout
        peers = self.visible_peer_ids()
        announced = time.monotonic()
        wanted = max(min_peers, 2 if expect_others else 1)
        soft_deadline = min(deadline, time.monotonic() + max(5.0, 2 * self.matchmaking_time))
        while len(peers) < wanted and time.monotonic() < (deadline if len(peers) < min_peers else soft_deadline):
            time.sleep(0.2)
            if time.monotonic() - announced > self.tracker.metadata_expiration / 3:
                # hivemind re-publishes a record only once the peer has samples: keep ours alive while we wait
                self.announce()
                announced = time.monotonic()
            peers = self.visible_peer_ids()
        if len(peers) < min_peers:
            log.warning(f"Saw {len(peers)} of the {min_peers} peers asked for within {timeout:.0f} s; starting anyway")
        self.check_model_signature()  # again: peers that started together publish while we wait
        self.publish_model_signature()
        self.refresh_progress(timeout=max(1.0, self.matchmaking_time))

        if self.tracker.global_epoch > self.local_epoch:
            log.info(f"Swarm is at step {self.tracker.global_epoch}; loading its state before the first local step")
            self.load_state_from_peers()

        my_id = self.dht.peer_id.to_bytes()
        index = peers.index(my_id) if my_id in peers else random.randrange(max(1, len(peers)))
        bits = grid_group_bits(index, max(len(peers), 1), self.group_size)
        self._key_length = len(bits)
        self.set_group_bits(bits)
        self._joined = True
        return len(peers)

    @property
    def _signature_key(self) -> str:
        return f"{self.run_id}_model_signature"

    def publish_model_signature(self) -> None:
        """Store this peer's :class:`ModelSignature` in the DHT (refreshed every global step while it trains)."""
        if self.model_signature is None:
            return
        expiration = max(60.0, self.tracker.metadata_expiration)
        self.dht.store(
            key=self._signature_key,
            subkey=self.dht.peer_id.to_base58(),
            value=self.model_signature.to_record(),
            expiration_time=get_dht_time() + expiration,
            return_future=True,  # fire and forget: the record only has to exist by the time someone joins
        )
        self._signature_published_at = time.monotonic()

    def check_model_signature(self) -> None:
        """Raise ``RuntimeError`` if a peer of this run published a model that differs from ours.

        Without this check hivemind fails deep inside the state download with a shape error, and retries forever.
        """
        if self.model_signature is None:
            return
        found = self.dht.get(self._signature_key, latest=True)
        if found is None or not isinstance(found.value, dict):
            return
        my_id = self.dht.peer_id.to_base58()
        for peer, record in found.value.items():
            theirs = ModelSignature.from_record(getattr(record, "value", None))
            if peer == my_id or theirs is None:
                continue
            difference = self.model_signature.mismatch(theirs)
            if difference is not None:
                raise RuntimeError(
                    f"Cannot join swarm run_id={self.run_id!r}: the model does not match the one its peers train "
                    f"(peer {peer}): {difference}. Every peer of a run must build the same architecture; "
                    f"use another run_id to train a different model."
                )

    def averagers(self) -> list[hivemind.DecentralizedAverager]:
        """The averagers this optimizer runs: state, and gradients unless in local-updates mode."""
        return [self.state_averager] + ([self.grad_averager] if self.grad_averager is not None else [])

    def set_group_bits(self, bits: str) -> None:
        """Put every averager of this peer in the grid bucket ``bits``."""
        for averager in self.averagers():
            averager.set_group_bits(bits)

    # ------------------------------------------------------------------------------------- hivemind hooks (private)
    def _maybe_schedule_gradient_averaging(self) -> None:
        # hivemind 1.1.12's, but no solo scheduling (see the module docstring) and with this peer's global step in the
        # round's gather, so that a member can tell a round of another step (see _average_gradients_and_load...)
        if self.tracker.global_progress.num_peers <= 1:
            return
        if self.tracker.estimated_next_update_time - get_dht_time() <= self.matchmaking_time:
            if self.scheduled_grads is None or self.scheduled_grads.triggered or self.scheduled_grads.done():
                self.scheduled_grads = self._book_gradient_round()

    def _begin_averaging_gradients(self, grad_scaler: Any) -> bool:
        if self.scheduled_grads is None and self.tracker.global_progress.num_peers > 1:
            self.scheduled_grads = self._book_gradient_round()  # what hivemind books here, with the gather
            if self.scheduled_grads is None:
                # no partner in this step's grid bucket: a local step on the gradients accumulated over the step (as
                # hivemind's solo path loads them; returning False alone would step on the last batch's .grad)
                if grad_scaler is not None:
                    with grad_scaler.running_global_step():
                        assert grad_scaler.unscale_(self)
                self._load_local_gradients_into_optimizer()
                return False
        return super()._begin_averaging_gradients(grad_scaler)

    def _book_gradient_round(self) -> Optional[StepControl]:
        """Book this global step's gradient round; None if this peer is alone in its grid bucket this step."""
        gather = {STEP_OF_ROUND: self.local_epoch}
        if self.delay_grad_averaging:
            # with delayed updates hivemind triggers the round from its background step: starting the all-reduce
            # early (below) left members waiting for late parts (soak "DPU, 3 peers": 28 partial all-reduce lines
            # in one run), so DPU keeps hivemind's own group assembly
            return self.grad_averager.schedule_step(gather=gather, timeout=self.averaging_timeout)
        # the round starts as soon as every live peer (of this peer's grid bucket) joined
        # (lightning_moshpit.matchmaking); the longer window only runs out when one is missing
        population = self._enter_grid_bucket()
        if population == 1:
            return None  # a grid that is not full leaves some peers without a partner along some dimension
        # an auxiliary peer has no progress record, so the live swarm size leaves it out: it counts itself
        wanted = max(2, population if population is not None else min(self.num_peers + int(self.auxiliary),
                                                                        self.group_size))  # fmt: skip
        self._round_wanted = wanted
        if wanted != self._target_group_size:
            set_target_group_size(self.grad_averager, wanted)
            self._target_group_size = wanted
        # hivemind requires the scheduled time to fall before the round's deadline (averaging_timeout from now)
        window = min(self.matchmaking_window, 0.9 * self.averaging_timeout)
        return self.grad_averager.schedule_step(
            scheduled_time=get_dht_time() + window, gather=gather, timeout=self.averaging_timeout
        )

    def _enter_grid_bucket(self) -> Optional[int]:
        """Put the gradient averager in this global step's bucket; return how many live peers share it.

        The bucket comes from :func:`~lightning_moshpit.averaging.grid_bucket`: this peer's position in the sorted
        peer ids of the live swarm (the progress records) and the global step, so every peer that sees the same
        swarm computes the same grid without any history (hivemind's key rotation is overwritten before each
        round). Off a grid (swarm <= ``group_size``) the key is empty and the population is the swarm. Returns None
        (and leaves the key alone) for a peer outside the records (an auxiliary peer) and under delayed parameter
        updates, where the previous round may still be matchmaking with the current key when the next is booked.
        """
        peer_ids = getattr(self.tracker, "live_peer_ids", [])
        me = self.dht.peer_id.to_bytes()
        if self.delay_grad_averaging or me not in peer_ids:
            return None
        bits, population = grid_bucket(peer_ids.index(me), len(peer_ids), self.group_size, self.local_epoch)
        # not waiting for the averager's answer: its control pipe is first in, first out, so the key is set before
        # the round this peer books next
        self.grad_averager.set_group_bits(round_key(bits, self.local_epoch), wait=False)
        self._key_length = len(bits)
        return population

    def _widen_matchmaking_window(self, record: AveragingRound) -> None:
        """After a gradient round without every live peer, widen the window to half of ``averaging_timeout``.

        "Every live peer" is the round's :attr:`AveragingRound.wanted`: the live swarm, or on a grid the live peers
        of this peer's bucket.

        The floor under ``matchmaking_time`` is how far apart the peers notice the end of a step, which grows with the
        swarm and the machine's load: 8 peers on 2 cores (about 40 processes) lag each other by more than 2 s, and
        with ``matchmaking_time=1`` (window 2 s) none of a soak run's rounds held all 8; with a 6 s window 40 of 53
        did. A round starts as soon as every live peer joined, so a wide window costs nothing while the swarm is
        complete; it only delays rounds that really miss a peer (a crashed one, until the progress tracker drops it
        after ``averaging_timeout``). So the window follows what the rounds show instead of refusing a setting.
        """
        if self.delay_grad_averaging:
            return  # DPU keeps hivemind's group assembly (no window of ours)
        complete = record.wanted or min(record.swarm_size, self.group_size)
        ceiling = max(2 * self.matchmaking_time, self.averaging_timeout / 2)
        if record.swarm_size > 1 and record.group_size < complete and self.matchmaking_window < ceiling:
            self.matchmaking_window = ceiling
            log.warning(f"A gradient round held {record.group_size} of {complete} peers; waiting up to "
                        f"{self.matchmaking_window:.1f} s for late peers from now on")  # fmt: skip

    @property
    def parameter_round_search_seconds(self) -> float:
        """How long a parameter round looks for its group: as long as a gradient round waits for late peers, plus
        the matchmaking time, not the whole ``averaging_timeout`` (see :mod:`lightning_moshpit.consistent_state`)."""
        return min(self.averaging_timeout, self.matchmaking_time + self.matchmaking_window)

    def _maybe_schedule_state_averaging(self) -> None:
        if self.tracker.global_progress.num_peers > 1:
            super()._maybe_schedule_state_averaging()

    def _average_gradients_and_load_into_optimizer(self, maybe_step_control: Optional[StepControl]) -> None:
        began = time.perf_counter()
        # an auxiliary peer applies no update, and its view of the step may lag the trainers': the check is theirs
        ahead = [] if self.auxiliary else self._members_ahead(maybe_step_control)
        if ahead:
            # hivemind's group keys carry no step, so a peer one step behind (it had just loaded the swarm's state, or
            # its view lagged) can join the round of the *next* step. Applying that average to this peer's older
            # parameters leaves it apart from the swarm for good (measured: 3e-3 one step later, 2.6e-2 after a
            # second such round). The others are fine: they all apply the same average. So this peer uses its own
            # gradients for this step, records a failed round, and loads the swarm's state before its next batch.
            log.warning(f"The gradient round of this peer's global step {self.local_epoch} included peers already at "
                        f"step {max(ahead)}; not applying it here, loading the swarm's state instead")  # fmt: skip
            self._resync_requested = True
            super()._average_gradients_and_load_into_optimizer(None)  # local gradients
            self._record_round(0, seconds=time.perf_counter() - began)
            return
        super()._average_gradients_and_load_into_optimizer(maybe_step_control)
        if maybe_step_control is None:
            return  # no round was attempted: this peer was alone
        group_size = 0
        if maybe_step_control.done() and maybe_step_control.exception() is None:
            group_size = len(maybe_step_control.result())
        self._record_round(group_size, seconds=time.perf_counter() - began)

    def _members_ahead(self, control: Optional[StepControl]) -> list[int]:
        """Global steps of the members of a finished gradient round that were ahead of this peer's."""
        if control is None:
            return []
        try:
            gathered = control.result(self.averaging_timeout)
        except BaseException:  # a failed round; hivemind's handler reports it
            return []
        steps = [value.get(STEP_OF_ROUND) for value in gathered.values() if isinstance(value, dict)]
        return [step for step in steps if isinstance(step, int) and step > self.local_epoch]

    def _record_round(self, group_size: int, seconds: float = 0.0) -> None:
        partial = self._partial_rounds.take() > 0
        record = AveragingRound(
            epoch=self.local_epoch,
            group_size=group_size,
            swarm_size=self.num_peers,
            succeeded=group_size > 0 and not partial,
            partial=partial,
            wanted=self._round_wanted,
            time=time.time(),
            seconds=seconds,
        )
        with self._rounds_lock:
            self.rounds.append(record)
        self._failures_in_a_row = 0 if record.succeeded else self._failures_in_a_row + 1
        self._widen_matchmaking_window(record)
        wanted_length = key_length(record.swarm_size, self.group_size)
        if record.succeeded and wanted_length == self._key_length:
            return
        if not record.succeeded and record.swarm_size > 1 and self._failures_in_a_row == WEDGED_AFTER_FAILURES:
            # recovery: this peer has been stepping alone, so its parameters left the swarm's; take the swarm's
            # state again (once per streak of failures) rather than train on apart
            log.warning(
                f"{self._failures_in_a_row} gradient-averaging rounds in a row failed although {record.swarm_size} "
                f"peers are visible; loading the swarm's state before the next batch (see docs/concepts.md)"
            )
            self._resync_requested = True
        if wanted_length or self._key_length:
            # the swarm outgrew (or shrank below) the grid, or this peer sat alone in a grid bucket: new bucket, for the
            # averagers that keep hivemind's key rotation (the state averager; the gradient averager only under DPU
            # or on an auxiliary peer: elsewhere each gradient round's key comes from _enter_grid_bucket)
            self._key_length = wanted_length
            bits = random_group_bits(wanted_length)
            if self.delay_grad_averaging or self.auxiliary:
                self.set_group_bits(bits)
            else:
                self.state_averager.set_group_bits(bits)

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore optimizer state and the global step (e.g. from a Lightning checkpoint), and tell the swarm."""
        super().load_state_dict(state_dict)
        with self.tracker.pause_updates():
            self.tracker.update_epoch(self.local_epoch)  # otherwise the tracker counts samples toward the old epoch
        if not self.client_mode:
            self.state_averager.state_sharing_priority = self.local_epoch
        self.announce()

    # -------------------------------------------------------------------------------------------------- stepping
    def step(self, closure: Any = None, batch_size: Optional[int] = None, grad_scaler: Any = None) -> Any:
        """Run ``closure``, check what it produced, report the samples and step as ``hivemind.Optimizer`` does.

        Without ``batch_size``, the count comes from :attr:`batch_size_source` *after* the closure ran (Lightning runs
        ``training_step`` inside the closure). A call without a closure (Lightning's AMP plugin runs the closure
        itself, then calls ``step()``) counts what it already ran. Two checks run between the backward pass and the
        moment the gradients join the swarm's accumulators:

        - non-finite gradients: the batch is dropped with a warning, so one NaN never reaches the swarm's mean;
        - a stale view of the swarm (the process was paused, or the DHT unreachable, for longer than
          :attr:`stale_after` seconds): the peer refreshes it, and if the swarm moved on while it was away, it drops
          its now-stale gradients and loads the swarm's state instead of averaging them into the current step.
        """
        self.check_children_alive()
        if self._resync_requested and not self.auxiliary:
            self._resync_requested = False
            self.load_state_from_peers()
        loss = None
        if closure is not None:
            # hivemind applies finished background (DPU) updates before running the closure; keep that order
            self.state_averager.step(apply_delayed_updates=True)
            with torch.enable_grad():
                loss = closure()
            closure = None
        if batch_size is None and self.batch_size_source is not None:
            batch_size = self.batch_size_source()
        if not self.auxiliary:
            if grad_scaler is None and self._drop_nonfinite_gradients():
                return loss
            if self._resync_if_behind():
                return loss
        if self.stop_at_epoch is not None and self.local_epoch >= self.stop_at_epoch:
            return loss  # the run ends at this global step (max_global_steps): no transition past it, e.g. right
            # after a state download that brought this peer to it within this very call
        epoch_before = self.local_epoch
        self.samples_reported += batch_size if batch_size is not None else (self.batch_size_per_step or 0)
        return_value = super().step(closure=closure, batch_size=batch_size, grad_scaler=grad_scaler)
        if self.interrupted:
            # hivemind catches BaseException around averaging, so a Ctrl-C that lands there is swallowed; re-raise it
            raise KeyboardInterrupt
        if self.local_epoch != epoch_before and time.monotonic() - self._signature_published_at > 30.0:
            self.publish_model_signature()  # keep the record alive while this peer trains
        return loss if return_value is None else return_value

    def average_final_state(self, timeout: float, patience: float = 0.0) -> int:
        """Synchronous parameter rounds at the end, so that peers stopping at the same global step hold one model.

        Gradient averaging applies the same update to every member, so a peer that missed a round (or took part in a
        partial one) keeps its offset from the others until a parameter round includes it. hivemind's parameter
        rounds run in the background and are applied at the *next* step, which a stopping peer never takes. So at
        ``max_global_steps`` every peer applies what is pending, then averages parameters and floating buffers
        synchronously with the peers that stop with it. (Not the optimizer's statistics: hivemind averages only those
        named in ``average_opt_statistics``, none by default; see the CHANGELOG's known issues.)

        Peers reach the last step up to a few seconds apart (a slow process applies its last update later), and a
        final round can match a late peer's ordinary background round. So each final round gathers a
        :data:`FINAL_ROUND` tag, and rounds repeat (for up to ``patience`` seconds) until one holds every live peer
        (``num_peers``), all tagged: then every member knows that the others stop with the same parameters.
        Returns the number of tagged members of the last round (0: it failed, 1: this peer was alone).

        Views of the swarm differ under load: with 8 peers on 2 cores, 7 peers once saw a swarm of 7, finished a
        round of 7 and left, while one member of that round saw 8 and averaged again with the late eighth peer,
        which moved it away from the 6 that had left (final parameters 4e-3 apart). So a peer that has been in a
        final round with others (it holds the state they left with) weighs 1 in the rounds after, and a peer that
        has not weighs :data:`UNAGREED_WEIGHT`: a latecomer then receives the agreed parameters (within 1e-6 of
        them relative to the difference) instead of pulling them toward its own, and peers that all start
        unagreed average with equal weights, as usual.

        The final rounds are one group of every stopping peer, also on a Moshpit grid (``group_size`` < peers). A
        grid reaches the exact mean only after one complete round per dimension in every bucket, in step: one
        failed bucket (a peer a second late) left its members' keys out of phase with the others', the next round's
        buckets held 3 and 1 peers, and no further round could complete (measured: the 4-peer ``group_size=2`` test
        ended with final parameters up to 2.9e-2 apart). One group needs no key agreement; it moves the same bytes
        per peer as a grid round (hivemind's butterfly all-reduce sends each peer 1/N of the model from each of
        the N members) and happens once per run.
        """
        self.state_averager.step(wait_for_delayed_updates=True, apply_delayed_updates=True)
        booked, self.scheduled_state = self.scheduled_state, None
        if booked is not None and not booked.done():
            # the round booked for the next step runs as booked (the others may be matched with it already); it is
            # not a final round, as its gather could not be tagged
            self._final_round(booked, timeout)
        num_peers = self.num_peers
        if num_peers <= 1:
            return 1
        give_up_at = time.monotonic() + patience
        # one bucket for every stopping peer (grid or not), assembled the moment all of them joined; the control
        # pipe is first in, first out, so both settings apply before the round below is scheduled
        self.state_averager.set_group_bits("")
        set_target_group_size(self.state_averager, num_peers)
        agreed = False  # this peer holds the parameters of a final round with others
        while True:
            control = self.state_averager.schedule_step(gather={FINAL_ROUND: self.local_epoch}, timeout=timeout)
            # hivemind's state averager takes no weight when scheduling; the control's weight is read when the
            # all-reduce begins, which needs this peer's trigger (in _final_round)
            control.weight = 1.0 if agreed else UNAGREED_WEIGHT
            gathered = self._final_round(control, timeout)
            finished = sum(isinstance(v, dict) and v.get(FINAL_ROUND) == self.local_epoch for v in gathered.values())
            agreed = agreed or finished >= 2
            if finished >= self.num_peers or time.monotonic() >= give_up_at:
                return finished
            log.info(f"Final parameter round: {finished} of {self.num_peers} peer(s) stopping together; "
                     f"averaging again")  # fmt: skip

    def _final_round(self, control: StepControl, timeout: float) -> dict:
        """Run a scheduled parameter round now and apply it; the members' gathered data (empty if it failed)."""
        self.state_averager.step(averaging_round=True, averaging_control=control, averaging_opts=dict(timeout=timeout))
        if control.done() and not control.cancelled() and control.exception() is None:
            return dict(control.result())
        return {}

    def check_children_alive(self) -> None:
        """Raise ``RuntimeError`` if the DHT or an averager process of this peer died: waiting on it would hang."""
        # exitcode polls the child (waitpid WNOHANG): None while it runs or before it started
        dead = [name for name, process in [("DHT", self.dht), *((type(a).__name__, a) for a in self.averagers())]
                if process.exitcode is not None]  # fmt: skip
        if dead:
            raise RuntimeError(
                f"This peer's {' and '.join(dead)} process(es) died (run_id={self.run_id!r}); it cannot average with "
                f"the swarm any more. Restart the peer: it will load the swarm's state and go on."
            )

    def shutdown(self) -> None:
        """Leave the swarm as ``hivemind.Optimizer.shutdown`` does, in bounded time even if a child process died.

        hivemind's goodbye stores a record through the DHT process and waits for delayed updates in the averager
        process; with either one dead, that blocked forever (a peer of ``benchmarks/resist.py`` never exited).
        """
        if self.dht.is_alive() and self.state_averager.is_alive():
            super().shutdown()
            return
        log.warning("A child process of this peer had died; leaving the swarm without saying goodbye")
        tracker = self.tracker
        tracker.shutdown_triggered.set()
        tracker.should_report_progress.set()
        tracker.global_state_updated.set()
        for averager in self.averagers():
            if averager.is_alive():
                averager.shutdown()

    @property
    def stale_after(self) -> float:
        """Seconds without a swarm-progress fetch after which this peer double-checks its global step before sending."""
        return max(2.0, self.matchmaking_time)

    def _named_parameters(self) -> list[tuple[str, torch.Tensor]]:
        parameters = list(self.state_averager.main_parameters)
        names = self.param_names if self.param_names and len(self.param_names) == len(parameters) else None
        return [(names[i] if names else f"parameter {i}", p) for i, p in enumerate(parameters)]

    def _drop_nonfinite_gradients(self) -> bool:
        """If any gradient is NaN/inf, zero them all, warn, and return True: this batch is not sent to the swarm."""
        problem = nonfinite_gradients(self._named_parameters())
        if problem is None:
            return False
        self.dropped_batches += 1
        for parameter in self.state_averager.main_parameters:
            if parameter.grad is not None:
                parameter.grad.zero_()
        log.warning(
            f"Dropped a batch at global step {self.local_epoch}: {problem}. Its gradients were not added to what this "
            f"peer averages with the swarm ({self.dropped_batches} batch(es) dropped so far)"
        )
        return True

    def _resync_if_behind(self) -> bool:
        """After a stale view of the swarm, load its state if it moved past this peer's step; True if it did."""
        tracker = self.tracker
        if not isinstance(tracker, SwarmProgressTracker):
            return False
        stale_for = time.time() - tracker.last_fetch_time
        if stale_for <= self.stale_after:
            return False
        self.refresh_progress(timeout=max(1.0, self.matchmaking_time))
        if tracker.global_epoch <= self.local_epoch:
            return False
        log.warning(f"This peer had not heard from the swarm for {stale_for:.1f} s (was the process paused?)")
        self.load_state_from_peers()
        return True

    def load_state_from_peers(self, **kwargs: Any) -> None:
        """Download the newest parameters, optimizer state and global step from a peer of this run.

        The same as ``hivemind.Optimizer.load_state_from_peers`` except that it gives up after
        :data:`LOAD_STATE_ATTEMPTS` failed downloads with a ``RuntimeError`` instead of retrying forever (hivemind
        1.1.12 loops on any exception, so a peer whose download always fails, e.g. on a shape mismatch, would hang).
        Downloads that raise nothing but serve nothing while this peer is more than one global step behind are
        counted across calls, and raise once they have gone on too long: see :meth:`_count_fruitless_download`.
        """
        if self._joined:  # after the start barrier, a state download means this peer fell behind the swarm
            self.resyncs += 1
            log.warning(
                f"This peer is at global step {self.local_epoch} while the swarm is at {self.tracker.global_epoch}: "
                f"dropping its stale gradients and loading the swarm's state (resynchronisation #{self.resyncs})"
            )
        if self.scheduled_grads is not None and not self.scheduled_grads.done():
            # tag along in the round already booked so the others need not restart matchmaking (as hivemind does)
            self._tag_along_with_zero_weight(self.scheduled_grads)
            self.scheduled_grads = None
        self.state_averager.step(wait_for_delayed_updates=True)

        with self.tracker.pause_updates():
            for attempt in range(1, LOAD_STATE_ATTEMPTS + 1):
                epoch_before = self.local_epoch
                try:
                    self.state_averager.load_state_from_peers(timeout=self.load_state_timeout, **kwargs)
                    if self.grad_averager is not None:
                        self.grad_averager.load_state_from_peers(timeout=self.load_state_timeout, **kwargs)
                except KeyboardInterrupt:
                    raise
                except Exception as error:
                    if attempt == LOAD_STATE_ATTEMPTS:
                        raise RuntimeError(
                            f"Could not load the swarm's state (run_id={self.run_id!r}) after {attempt} attempts: "
                            f"{type(error).__name__}: {error}"
                        ) from error
                    log.warning(f"Loading the swarm's state failed ({type(error).__name__}: {error}); retrying")
                    continue
                self._count_fruitless_download(epoch_before)
                break

            for _ in range(3):
                if self.local_epoch != self.tracker.global_epoch - 1:
                    break
                # The peer that served us had not finished the step the swarm just took. hivemind would only bump the
                # step counter here, leaving this peer one update behind; its newer state is usually a moment away.
                time.sleep(0.5)
                self.state_averager.load_state_from_peers(timeout=self.load_state_timeout, **kwargs)
            self._download_the_swarms_step(**kwargs)
            if self.tracker.global_epoch - 1 <= self.local_epoch < self.tracker.global_epoch:
                log.warning(f"The newest state served was of global step {self.local_epoch}, the swarm is at "
                            f"{self.tracker.global_epoch}; catching up as hivemind does (the next parameter round "
                            f"brings this peer to the swarm's parameters)")  # fmt: skip
                self.state_averager.local_epoch = self.tracker.global_epoch
            self.tracker.report_local_progress(local_epoch=self.local_epoch, samples_accumulated=0)
            if not self.client_mode:
                self.state_averager.state_sharing_priority = self.local_epoch
            if self.use_gradient_averaging:
                self.grad_averager.reset_accumulated_grads_()
                if not self.client_mode:
                    self.grad_averager.state_sharing_priority = self.local_epoch

    def _download_the_swarms_step(self, **kwargs: Any) -> None:
        """Download again, for a few seconds, while the state served is one global step behind the swarm's.

        hivemind relabels such a state as the swarm's step ("catching up") although its parameters lack that step's
        update: the peer then trains one update apart from the others (measured: 2.6e-2 after a pause). The holders
        that are one step behind are in the middle of that update; a holder that finished it serves the right state
        within about one averaging round, so this retries for ``matchmaking_time + averaging_timeout`` at most.
        """
        deadline = time.monotonic() + self.matchmaking_time + self.averaging_timeout
        while self.local_epoch == self.tracker.global_epoch - 1 and time.monotonic() < deadline:
            time.sleep(0.2)
            try:
                self.state_averager.load_state_from_peers(timeout=self.load_state_timeout, **kwargs)
            except Exception as error:  # noqa: BLE001 - the download above succeeded; keep what it gave
                log.warning(f"Downloading the swarm's newer state failed ({type(error).__name__}: {error})")
                return

    def _count_fruitless_download(self, epoch_before: int) -> None:
        """Raise ``RuntimeError`` once downloads that served nothing have gone on too long; otherwise just count.

        hivemind's ``load_state_from_peers`` returns ``None`` both when it loaded a state and when no peer served a
        newer one (nobody answered, every holder refused, or the served state was not ahead), so the global step is
        the only evidence. Such a download leaves this peer behind, and hivemind's ``step()`` downloads again at the
        next batch: without a bound, a peer that nobody can serve never trains and never fails. It is not an error at
        once, though: right after bootstrapping the holders may not be found yet, and a record of a peer that ran
        ahead and died (or lied) keeps the swarm's step too high until it expires, which the tracker can only see
        between calls. So it fails only after :data:`LOAD_STATE_ATTEMPTS` such downloads in a row spanning more than
        :attr:`fruitless_download_budget` seconds. One step behind is left to the catch-up, as in hivemind.
        """
        if self.local_epoch != epoch_before or self.local_epoch >= self.tracker.global_epoch - 1:
            self._fruitless_downloads, self._fruitless_since = 0, None
            return
        now = time.monotonic()
        self._fruitless_downloads += 1
        self._fruitless_since = self._fruitless_since or now
        waited = now - self._fruitless_since
        if self._fruitless_downloads >= LOAD_STATE_ATTEMPTS and waited > self.fruitless_download_budget:
            raise RuntimeError(
                f"Could not load the swarm's state (run_id={self.run_id!r}): {self._fruitless_downloads} downloads in "
                f"{waited:.0f} s served nothing newer than this peer's global step {self.local_epoch}, while the "
                f"swarm's progress records claim step {self.tracker.global_epoch}. Causes: no peer that holds the "
                f"state is reachable, they refuse this peer (a different swarm secret?), or a stale or false progress "
                f"record."
            )
        log.warning(
            f"No peer served a state newer than global step {self.local_epoch} (the swarm claims "
            f"{self.tracker.global_epoch}); trying again at the next batch ({self._fruitless_downloads} in a row)"
        )

    @property
    def fruitless_download_budget(self) -> float:
        """Seconds of state downloads that serve nothing after which :meth:`load_state_from_peers` raises: twice the
        lifetime of a progress record (at least 30 s), so that a record of a vanished peer has expired by then."""
        return max(30.0, 2.0 * float(self.tracker.metadata_expiration))

    def __del__(self) -> None:
        # hivemind's __del__ shuts the averagers down. Lightning wraps optimizers in a dynamic subclass that shares
        # this object's state, so garbage-collecting that wrapper would kill our averagers mid-run. The strategy
        # calls shutdown() explicitly in teardown instead.
        pass
