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
from hivemind.utils import ValueWithExpiration, get_dht_time

from lightning_moshpit.averaging import grid_group_bits, key_length, random_group_bits

log = logging.getLogger(__name__)

#: After this many failed rounds in a row while other peers are visible, the averager is moved to a new group key.
WEDGED_AFTER_FAILURES = 3


@dataclasses.dataclass(frozen=True)
class AveragingRound:
    """One gradient-averaging attempt, as seen by this peer."""

    epoch: int  #: the global step (hivemind epoch) this round belongs to
    group_size: int  #: peers in the group that averaged (0 if the round failed)
    swarm_size: int  #: peers the progress tracker saw when the round ended (this peer included)
    succeeded: bool
    time: float  #: wall-clock time (``time.time()``) when the round ended


class SwarmProgressTracker(ProgressTracker):
    """hivemind's ProgressTracker with a sample count that does not lag behind the swarm.

    Stock hivemind decides that the swarm reached ``target_batch_size`` from the DHT records it fetched last, plus
    this peer's own samples since. Two things make that count lag, and each lag makes the swarm overshoot the target
    (measured here: about 2-3x with 3 peers whose global step lasts less than a refresh period):

    - on every refresh it replaces its view with the DHT records, *including its own*, which lags behind the
      asynchronous store; we substitute the live local record;
    - between refreshes it ignores what the other peers have done since their last report; we extrapolate each
      peer's count with the throughput it reported, as hivemind already does for its ETA estimate.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._others: list[tuple[int, float, float]] = []  # (samples, report time, samples/s) of current-epoch peers
        super().__init__(*args, **kwargs)

    def _parse_swarm_progress_data(self, metadata: Any) -> Any:
        own = self.local_progress
        others: list[LocalTrainingProgress] = []
        if isinstance(metadata, dict) and metadata:
            for record in metadata.values():
                value = getattr(record, "value", None)
                if isinstance(value, dict) and value.get("peer_id") != own.peer_id:
                    others.append(LocalTrainingProgress.parse_obj(value))
            metadata = {subkey: ValueWithExpiration(p.dict(), float("inf")) for subkey, p in enumerate(others)}
            metadata["self"] = ValueWithExpiration(own.dict(), float("inf"))
        progress = super()._parse_swarm_progress_data(metadata)
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
        others = sum(
            samples + (min(horizon, max(0.0, now - when)) * speed if samples > 0 else 0.0)
            for samples, when, speed in self._others
        )
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
    """

    def __init__(self, *, group_size: int, **kwargs: Any) -> None:
        self.group_size = group_size
        self.rounds: list[AveragingRound] = []
        self.batch_size_source: Optional[Callable[[], int]] = None
        self.samples_reported = 0  #: samples this peer has contributed through step() since it was created
        self._rounds_lock = threading.Lock()
        self._failures_in_a_row = 0
        self._key_length = 0  # bits in this peer's current grid key (0: the whole swarm is one group)
        super().__init__(**kwargs)

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
                peer_ids.append(value["peer_id"])
        return sorted(set(peer_ids))

    def refresh_progress(self, timeout: float) -> None:
        """Make the progress tracker fetch the swarm's progress now and wait (up to ``timeout``) until it has."""
        tracker = self.tracker
        tracker.fetched_global_progress_this_epoch.clear()
        tracker.global_progress.next_fetch_time = 0.0
        tracker.global_state_updated.set()
        tracker.fetched_global_progress_this_epoch.wait(timeout)

    def join_swarm(self, min_peers: int, timeout: float) -> int:
        """The start barrier: announce, wait for ``min_peers`` (up to ``timeout`` s), catch up, take a grid position.

        Returns the number of peers seen. Waiting is bounded: after ``timeout`` the peer starts with whoever is there
        and logs a warning, because a decentralized swarm has no guaranteed size.
        """
        self.announce()
        deadline = time.monotonic() + timeout
        peers = self.visible_peer_ids()
        while len(peers) < min_peers and time.monotonic() < deadline:
            time.sleep(0.2)
            peers = self.visible_peer_ids()
        if len(peers) < min_peers:
            log.warning(f"Saw {len(peers)} of the {min_peers} peers asked for within {timeout:.0f} s; starting anyway")
        self.refresh_progress(timeout=max(1.0, self.matchmaking_time))

        if self.tracker.global_epoch > self.local_epoch:
            log.info(f"Swarm is at step {self.tracker.global_epoch}; loading its state before the first local step")
            self.load_state_from_peers()

        my_id = self.dht.peer_id.to_bytes()
        index = peers.index(my_id) if my_id in peers else random.randrange(max(1, len(peers)))
        bits = grid_group_bits(index, max(len(peers), 1), self.group_size)
        self._key_length = len(bits)
        self.set_group_bits(bits)
        return len(peers)

    def averagers(self) -> list[hivemind.DecentralizedAverager]:
        """The averagers this optimizer runs: state, and gradients unless in local-updates mode."""
        return [self.state_averager] + ([self.grad_averager] if self.grad_averager is not None else [])

    def set_group_bits(self, bits: str) -> None:
        """Put every averager of this peer in the grid bucket ``bits``."""
        for averager in self.averagers():
            averager.set_group_bits(bits)

    # ------------------------------------------------------------------------------------- hivemind hooks (private)
    def _maybe_schedule_gradient_averaging(self) -> None:
        if self.tracker.global_progress.num_peers > 1:  # no solo scheduling: see the module docstring
            super()._maybe_schedule_gradient_averaging()

    def _maybe_schedule_state_averaging(self) -> None:
        if self.tracker.global_progress.num_peers > 1:
            super()._maybe_schedule_state_averaging()

    def _average_gradients_and_load_into_optimizer(self, maybe_step_control: Optional[StepControl]) -> None:
        super()._average_gradients_and_load_into_optimizer(maybe_step_control)
        if maybe_step_control is None:
            return  # no round was attempted: this peer was alone
        group_size = 0
        if maybe_step_control.done() and maybe_step_control.exception() is None:
            group_size = len(maybe_step_control.result())
        self._record_round(group_size)

    def _record_round(self, group_size: int) -> None:
        record = AveragingRound(
            epoch=self.local_epoch,
            group_size=group_size,
            swarm_size=self.num_peers,
            succeeded=group_size > 0,
            time=time.time(),
        )
        with self._rounds_lock:
            self.rounds.append(record)
        self._failures_in_a_row = 0 if record.succeeded else self._failures_in_a_row + 1
        wanted_length = key_length(record.swarm_size, self.group_size)
        if record.succeeded and wanted_length == self._key_length:
            return
        if not record.succeeded and wanted_length == 0 and self._failures_in_a_row >= WEDGED_AFTER_FAILURES:
            log.warning(
                f"{self._failures_in_a_row} gradient-averaging rounds in a row found no group although "
                f"{record.swarm_size} peers are visible; the averager may be wedged (see docs/concepts.md)"
            )
        if wanted_length or self._key_length:
            # the swarm outgrew (or shrank below) the grid, or this peer sat alone in a grid bucket: new bucket
            self._key_length = wanted_length
            self.set_group_bits(random_group_bits(wanted_length))

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
        """Run ``closure``, report the samples it processed and step as ``hivemind.Optimizer`` does.

        Without ``batch_size``, the count comes from :attr:`batch_size_source` *after* the closure ran. A call without
        a closure (Lightning's AMP plugin runs the closure itself, then calls ``step()``) counts what it already ran.
        """
        loss = None
        if batch_size is None and self.batch_size_source is not None:
            if closure is not None:
                # hivemind applies finished background (DPU) updates before running the closure; keep that order
                self.state_averager.step(apply_delayed_updates=True)
                with torch.enable_grad():
                    loss = closure()
                closure = None
            batch_size = self.batch_size_source()
        self.samples_reported += batch_size if batch_size is not None else (self.batch_size_per_step or 0)
        return_value = super().step(closure=closure, batch_size=batch_size, grad_scaler=grad_scaler)
        return loss if return_value is None else return_value

    def __del__(self) -> None:
        # hivemind's __del__ shuts the averagers down. Lightning wraps optimizers in a dynamic subclass that shares
        # this object's state, so garbage-collecting that wrapper would kill our averagers mid-run. The strategy
        # calls shutdown() explicitly in teardown instead.
        pass
