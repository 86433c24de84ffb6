"""What ResIST and IST share: rounds of ``local_steps`` batches, each peer training one of S random sub-networks.

:class:`SubnetTraining` is the Lightning side of both callbacks. A *round* is ``local_steps`` training batches. At
the start of round ``r`` every peer draws the round's partition from a random generator seeded by ``(run_id, r)``
(:func:`round_seed`), so all peers at round ``r`` draw the same one without talking to each other, and picks
sub-network ``(position + r) mod S``. ``position`` is this peer's index among the swarm's peer ids sorted (taken
when training starts), so peers spread evenly over the sub-networks while the swarm keeps its members; a peer that
joins later simply takes a position after the others. None of this needs ranks: two peers that picked the same
sub-network just average it between them, and a sub-network nobody picked keeps its value for that round.

**In a swarm** (``MoshpitStrategy(local_updates=True)``) the callback replaces the strategy's parameter averaging:
at the end of every round it runs one holder-weighted round (:class:`~lightning_moshpit.holder_averaging.
HolderAverager`) where the peer sends the tensors it trained and receives the ones it needs next. The strategy keeps
counting samples and global steps; its own state averaging is switched off for the fit. When training ends, one
last round sends what was trained since the previous round and receives every tensor, so each peer leaves with the
whole model. **In a single process** (any other strategy) the callback just draws a new sub-network every round.

Subclasses say what a sub-network is (:meth:`SubnetTraining._plan`, :meth:`SubnetTraining._activate`) and what is
averaged (:meth:`SubnetTraining._averaged_tensors`, :meth:`SubnetTraining._masks`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
import zlib
from typing import Any, Optional

import lightning as L
import torch

from lightning_moshpit.averaging import averager_options, grid_group_bits
from lightning_moshpit.holder_averaging import HolderAverager, HolderMasks

log = logging.getLogger(__name__)

#: ``average_state_every`` the callbacks give a MoshpitStrategy: its own parameter averaging never runs.
STATE_AVERAGING_OFF = 2**31


def round_seed(run_id: str, round_index: int, *salt: int) -> int:
    """A 63-bit seed every peer derives identically from the run and the round (and optional extra numbers)."""
    text = ":".join([run_id, str(round_index), *map(str, salt)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def check_count(value: Any, name: str, minimum: int = 1) -> int:
    """Validate an integer option (``num_subnets``, ``local_steps`` ...) with an error that names it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class SubnetRound:
    """One holder-weighted averaging round, as this peer saw it."""

    round: int  #: the round that ended (``-1`` for the final round at the end of training)
    subnet: int  #: the sub-network this peer trained in it
    group_size: int  #: peers that averaged together (0: no group formed; the peer kept its own values)
    bytes_sent: float  #: bytes of all-reduce messages this peer sent in the round
    seconds: float  #: wall-clock time of the round (matchmaking included)


class SubnetTraining(L.Callback):
    """Base class of :class:`~lightning_moshpit.callbacks.ResIST` and :class:`~lightning_moshpit.callbacks.
    IndependentSubnet`; see the module docstring. Not used directly."""

    kind = "subnet"  #: part of the averager's DHT prefix, so ResIST and IST runs never share groups

    def __init__(self, num_subnets: Optional[int], local_steps: int, seed: int, reset_optimizer: bool) -> None:
        if num_subnets is not None:
            check_count(num_subnets, "num_subnets (S, the number of sub-networks)")
        self.requested_subnets = num_subnets
        self.local_steps = check_count(local_steps, "local_steps")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"`seed` must be an integer, got {seed!r}")
        self.seed = seed
        self.reset_optimizer = bool(reset_optimizer)
        self.num_subnets = num_subnets or 1  #: S in use (fixed when training starts)
        self.round = 0  #: the current round
        self.subnet = 0  #: the sub-network this peer trains in the current round
        self.rounds: list[SubnetRound] = []  #: holder-weighted rounds of this fit (swarm only)
        self._position = 0
        self._run_id = f"local:{seed}"
        self._strategy: Any = None
        self._averager: Optional[HolderAverager] = None
        self._started = False
        self._batches = 0

    # ------------------------------------------------------------------------------------------ subclass API
    def _prepare(self, model: torch.nn.Module) -> None:
        """Find the parts of ``model`` and install the switches (called in ``setup``); raise on a bad model."""
        raise NotImplementedError

    def _plan(self, round_index: int) -> Any:
        """The partition of round ``round_index`` (drawn from :func:`round_seed`); passed back to the methods below."""
        raise NotImplementedError

    def _activate(self, plan: Any, subnet: Optional[int]) -> None:
        """Make ``subnet`` of ``plan`` the trained one (``None``: every part, as after training)."""
        raise NotImplementedError

    def _averaged_tensors(self) -> list[torch.Tensor]:
        """Fresh copies of what a swarm round averages (fixed shapes and order for the whole fit)."""
        raise NotImplementedError

    def _read(self, plan: Any, into: list[torch.Tensor]) -> None:
        """Copy the model's current values into the averaged tensors (laid out for ``plan``)."""
        raise NotImplementedError

    def _write(self, plan: Any, source: list[torch.Tensor], needs: frozenset[int]) -> None:
        """Copy the averaged tensors listed in ``needs`` back into the model."""
        raise NotImplementedError

    def _masks(self, plan: Any, subnet: int, next_plan: Optional[Any], next_subnet: Optional[int]) -> HolderMasks:
        """This peer's masks: it holds ``subnet`` of ``plan``; it needs ``next_subnet`` of ``next_plan`` (None: all)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._prepare(pl_module)
        from lightning_moshpit.strategy import MoshpitStrategy  # the strategy imports the callbacks package

        strategy = trainer.strategy
        self._strategy = strategy if isinstance(strategy, MoshpitStrategy) and stage == "fit" else None
        if self._strategy is None:
            return
        if not strategy.local_updates:
            raise ValueError(
                f"{type(self).__name__} in a swarm needs MoshpitStrategy(local_updates=True): every peer trains its "
                f"sub-network with local steps and the callback averages parameters each round"
            )
        if strategy.private or strategy.aggregation != "mean":
            raise ValueError(
                f"{type(self).__name__} averages with its own holder-weighted averager, which supports neither "
                f"swarm_secret nor aggregation='centered_clip' yet; got private={strategy.private}, "
                f"aggregation={strategy.aggregation!r}"
            )
        strategy.average_state_every = STATE_AVERAGING_OFF  # our rounds replace the strategy's parameter averaging
        self._run_id = strategy.run_id

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if not self._started:
            self._start()
        self._activate(self._current_plan, self.subnet)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._batches += 1
        if self._batches % self.local_steps == 0:
            self._next_round(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._started and self._averager is not None:
            self._average(final=True)
        self._shutdown()
        if self._started:
            self._activate(self._current_plan, None)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._shutdown()

    # ------------------------------------------------------------------------------------------ rounds
    def _start(self) -> None:
        self._started = True
        strategy = self._strategy
        peers = 1
        if strategy is not None:
            optimizer = strategy.swarm_optimizer
            ids = optimizer.visible_peer_ids() if optimizer is not None else []
            my_id = strategy.dht.peer_id.to_bytes()
            peers = max(1, len(ids))
            self._position = ids.index(my_id) if my_id in ids else zlib.crc32(my_id) % max(peers, 1)
        self.num_subnets = self.requested_subnets or peers
        self._current_plan = self._plan(self.round)
        self.subnet = self._subnet_of(self.round)
        if strategy is not None:
            options = averager_options(strategy.group_size, strategy.matchmaking_time)
            options["initial_group_bits"] = grid_group_bits(self._position, peers, strategy.group_size)
            tensors = self._averaged_tensors()
            self._averager = HolderAverager(
                tensors,
                strategy.dht,
                prefix=f"{strategy.run_id}_{self.kind}_holders",
                start=True,
                min_matchmaking_time=strategy.matchmaking_time,
                next_chunk_timeout=max(strategy.matchmaking_time, strategy.averaging_timeout / 3),
                client_mode=strategy.client_mode,
                **options,
            )
        log.info(f"{type(self).__name__}: S={self.num_subnets}, position {self._position}, round 0 trains "
                 f"sub-network {self.subnet}")  # fmt: skip

    def _subnet_of(self, round_index: int) -> int:
        return (self._position + round_index) % self.num_subnets

    def _next_round(self, trainer: L.Trainer) -> None:
        if self._averager is not None:
            self._average(final=False)
        self.round += 1
        self._current_plan = self._plan(self.round)
        self.subnet = self._subnet_of(self.round)
        if self.reset_optimizer:
            _reset_optimizer_state(trainer)

    def _average(self, final: bool) -> None:
        averager, strategy = self._averager, self._strategy
        assert averager is not None and strategy is not None
        next_plan = None if final else self._plan(self.round + 1)
        next_subnet = None if final else self._subnet_of(self.round + 1)
        masks = self._masks(self._current_plan, self.subnet, next_plan, next_subnet)
        started, bytes_before = time.monotonic(), averager.bytes_sent
        with averager.get_tensors() as tensors:
            self._read(self._current_plan, tensors)
        group = averager.average(masks, timeout=strategy.averaging_timeout)
        if group:
            with averager.get_tensors() as tensors, torch.no_grad():
                self._write(self._current_plan, tensors, masks.needs)
        self.rounds.append(SubnetRound(-1 if final else self.round, self.subnet, group,
                                       averager.bytes_sent - bytes_before, time.monotonic() - started))  # fmt: skip

    def _shutdown(self) -> None:
        averager, self._averager = self._averager, None
        if averager is not None:
            averager.shutdown()


def _reset_optimizer_state(trainer: L.Trainer) -> None:
    """Forget momentum and other per-parameter state: ResIST re-creates the optimizer at each repartition."""
    for optimizer in trainer.optimizers:
        inner = getattr(getattr(optimizer, "state_averager", None), "optimizer", None)  # hivemind wraps the real one
        for target in (optimizer, inner):
            state = getattr(target, "state", None)
            if isinstance(state, dict):
                state.clear()
