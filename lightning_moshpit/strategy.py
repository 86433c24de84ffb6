"""MoshpitStrategy: decentralized, fault-tolerant data parallelism for Lightning over unreliable machines."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import deque
from typing import Any, Callable, Optional, Union

import hivemind
import torch
from lightning.fabric.strategies.registry import _StrategyRegistry
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch.optim.lr_scheduler import ReduceLROnPlateau

from lightning_moshpit import security, swarm
from lightning_moshpit.adapters import (
    GlobalStepScheduler,
    check_optimizer_kwargs,
    optimizer_factory,
    rebinding_scheduler_factory,
)
from lightning_moshpit.averaging import averager_options, check_group_size, make_compression
from lightning_moshpit.guards import ModelSignature
from lightning_moshpit.monitor import MetricsPublisher
from lightning_moshpit.optimizer import AveragingRound, SwarmOptimizer, SwarmProgressTracker
from lightning_moshpit.reducers import (
    DEFAULT_CLIP_ITERS,
    DEFAULT_DROP_FACTOR,
    check_aggregation,
    gradient_averager_factory,
)

log = logging.getLogger(__name__)

#: Seconds between two metrics records a training peer stores in the DHT (see ``MoshpitStrategy._publish_metrics``).
METRICS_PERIOD = 1.0
#: ``average_state_every`` of an auxiliary peer: so large that it never joins a state-averaging round.
AUXILIARY_STATE_AVERAGING_OFF = 2**31


class MoshpitStrategy(SingleDeviceStrategy):
    """Train one model together with whoever joins the swarm: one process and one device per peer.

    DDP assumes a fixed world that all-reduces every step. A *swarm* instead is whoever shares a ``run_id`` right
    now: peers join, leave, stall or crash at any time and talk over slow links. Three ideas make that work:

    - **Target global batch.** Each peer accumulates gradients locally and reports how many samples it has
      processed. When the whole swarm has processed ``target_batch_size`` samples, peers average their gradients
      and take **one global optimizer step** together, whatever their number or speed. Hyperparameters therefore
      belong to ``target_batch_size``, not to the number of peers.
    - **Moshpit averaging.** Peers average in groups of at most ``group_size`` arranged on a virtual grid; groups
      re-form along the next grid dimension each round, so N = M^d peers reach the exact average in d rounds and
      a failing peer only drops out of its own group. Swarms of up to ``group_size`` peers average in one group.
    - **Delayed parameter updates** (``delay_parameter_updates=True``, or ``strategy="moshpit_dpu"``): averaging and
      the optimizer step run in the background while the next batch is computed, at the cost of one step of
      staleness.

    The engine is hivemind (DHT, libp2p daemon, decentralized averagers); see :mod:`lightning_moshpit.optimizer`
    for the fixes that make averaging succeed every round on small swarms.

    Example::

        import lightning as L
        import lightning_moshpit  # registers "moshpit" and "moshpit_dpu"

        strategy = MoshpitStrategy(target_batch_size=4096, run_id="my_run")
        trainer = L.Trainer(strategy=strategy, max_steps=10_000)
        trainer.fit(model, datamodule)
        # on another machine: MoshpitStrategy(..., initial_peers=strategy.peer_addresses)

    Args:
        target_batch_size: Samples the whole swarm processes per global optimizer step. Tune the learning rate for
            this batch size. Default: env ``MOSHPIT_TARGET_BATCH_SIZE``, else 4096. Make one global step last several
            times ``matchmaking_time``, or averaging overhead shows.
        run_id: Swarm namespace: peers with the same ``run_id`` (and DHT) train together. Default: env
            ``MOSHPIT_RUN_ID``, else ``"moshpit"``. Use a unique name per experiment.
        initial_peers: Multiaddrs of any running peer (list or comma-separated string), e.g. another peer's
            :attr:`peer_addresses`. Default: env ``MOSHPIT_INITIAL_PEERS``; empty starts a new swarm.
        host_maddrs: Where this peer listens. Default: env ``MOSHPIT_HOST_MADDRS``, else ``["/ip4/0.0.0.0/tcp/0"]``
            (every interface, a free port). Use ``/ip4/127.0.0.1/tcp/0`` for a swarm on one machine.
        matchmaking_time: Seconds a peer waits to gather its averaging group. 1-3 s on a LAN, 5-15 s over the
            internet or with many peers. One global step never takes less than this.
        averaging_timeout: Give up on an averaging round after this many seconds and step with local gradients.
            Must exceed ``matchmaking_time``; about twice the time an all-reduce really takes.
        max_global_steps: Every peer stops training once the swarm reaches this global step, with the same
            parameters and buffers as the others, however many local batches it ran. Lightning's ``max_steps``
            counts *local* batches, which differ between peers, so peers that stop by it end with different models;
            with ``max_global_steps`` set, the Trainer's ``max_steps`` and ``max_epochs`` are lifted for the fit (a
            peer that ran out of epochs would leave the swarm early). Default: env ``MOSHPIT_MAX_GLOBAL_STEPS``, else
            ``None``: only the Trainer's own limits stop a peer.
        batch_size: Samples per local batch. ``None`` infers it from every batch (a short last batch is counted
            correctly); set it when your batches are not tensors or collections of tensors.
        group_size: Moshpit group side M, a power of two: peers average in groups of at most M on a grid. Swarms of
            at most M peers average as one group. Lower it for large swarms on slow links.
        delay_parameter_updates: Average and step in the background while the next batch computes (DeDLOC's DPU).
            Hides communication; gradients are one global step stale. Needs an optimizer hivemind can rebuild.
        local_updates: Moshpit-SGD / local-SGD mode: every peer takes a local optimizer step every batch, and the
            swarm averages *parameters* every ``average_state_every`` global steps instead of averaging gradients.
        average_state_every: Average parameters (and floating buffers) every this many global steps.
        compression: Wire format for averaging: ``"none"``, ``"fp16"``, ``"scaled-fp16"``, ``"uint8"`` or
            ``"size-adaptive"`` (uint8 for large tensors, fp16 for small ones).
        client_mode: Set for a peer behind NAT or a firewall: it connects out but accepts no connections.
        announce_maddrs: Public multiaddrs to advertise when the listening address is not reachable from outside.
        identity_path: File with this peer's private key, so its peer id (and join address) survives restarts.
        min_peers: Start barrier: before the first step wait until this many peers (this one included) are visible.
        min_peers_timeout: Wait at most this many seconds for ``min_peers``, then start with whoever is there.
        aggregation: How each averaging group combines its members' vectors: ``"mean"`` (hivemind's weighted
            average, the default) or ``"centered_clip"`` (Byzantine-tolerant CenteredClip, as in BTARD: one peer
            sending huge, flipped or NaN gradients cannot wreck the run; see docs/security.md for what it does not
            defend). Applies to gradient and parameter (state) rounds. Every peer of a run must use the same value:
            clipping peers only form groups with clipping peers.
        clip_tau: CenteredClip radius: a member farther than this from the robust average pulls it as if it were
            at this distance. ``None`` (default) adapts it each round to the median distance of the members to their
            coordinate-wise median, which needs no tuning; set a number only if you know your gradients' scale.
        clip_iters: CenteredClip iterations after the coordinate-wise median start (it stops earlier once it
            converges). Each costs one pass over the vector part a peer reduces; 10 is plenty in practice.
        clip_drop: After clipping, reject (weight 0) members farther than this many radii from the result and clip
            again without them (BTARD-style), so one far outlier has no pull at all instead of about ``τ / n`` per
            round; never more than a minority of the group. ``None`` only clips. Default 4: honest members lie about
            one radius away (at most 2.4 in a simulation on digits gradients), the attacks of docs/security.md
            about 1000.
        bootstrap_timeout: Seconds to reach ``initial_peers`` before raising a ``ConnectionError`` naming them.
        verbose: Log hivemind's progress messages (rounds, peers, state downloads) at INFO level.
        swarm_secret: Make the swarm private: only peers started with the same secret (at least 16 characters) can
            join its DHT, publish progress records or average with it; others are refused with a warning naming their
            peer id. Default: env ``MOSHPIT_SWARM_SECRET``, else an open swarm. Prefer the environment variable, so
            the secret stays out of scripts and shell history; it is never printed or logged. Every peer of the run,
            auxiliary and monitor peers included, needs it. See ``docs/security.md`` for what it does not protect.
        join_command: The command a newcomer runs to join (``python train.py fit --tiny``), shown in the line a peer
            that starts a new swarm logs, after the variables it needs (``MOSHPIT_RUN_ID=... MOSHPIT_INITIAL_PEERS=...``).
            ``None`` shows the placeholder ``python <your script>``. ``lightning_moshpit.lightning_cli.SwarmCLI`` sets
            it to the command that started this peer, so the logged line can be pasted as it is.
        **optimizer_kwargs: Passed through to ``hivemind.Optimizer`` (e.g. ``load_state_timeout``,
            ``averager_opts``, ``tracker_opts``, ``reuse_grad_buffers``).
    """

    strategy_name = "moshpit"

    def __init__(
        self,
        target_batch_size: Optional[int] = None,
        run_id: Optional[str] = None,
        initial_peers: swarm.MaddrsArg = None,
        host_maddrs: swarm.MaddrsArg = None,
        matchmaking_time: float = 5.0,
        averaging_timeout: float = 30.0,
        max_global_steps: Optional[int] = None,
        batch_size: Optional[int] = None,
        group_size: int = 16,
        delay_parameter_updates: bool = False,
        local_updates: bool = False,
        average_state_every: int = 1,
        compression: str = "none",
        client_mode: bool = False,
        announce_maddrs: swarm.MaddrsArg = None,
        identity_path: Optional[str] = None,
        min_peers: int = 1,
        min_peers_timeout: float = 60.0,
        bootstrap_timeout: float = 30.0,
        aggregation: str = "mean",
        clip_tau: Optional[float] = None,
        clip_iters: int = DEFAULT_CLIP_ITERS,
        clip_drop: Optional[float] = DEFAULT_DROP_FACTOR,
        verbose: bool = False,
        swarm_secret: Optional[str] = None,
        join_command: Optional[str] = None,
        accelerator: Any = None,
        checkpoint_io: Any = None,
        precision_plugin: Optional[Precision] = None,
        **optimizer_kwargs: Any,
    ) -> None:
        super().__init__(
            device="cpu", accelerator=accelerator, checkpoint_io=checkpoint_io, precision_plugin=precision_plugin
        )
        self.target_batch_size = swarm.resolve_target_batch_size(target_batch_size)
        self._target_from_env = target_batch_size is None and bool(os.environ.get(swarm.ENV_TARGET_BATCH_SIZE))
        self.run_id = swarm.resolve_run_id(run_id)
        self.initial_peers = swarm.resolve_initial_peers(initial_peers)
        self.host_maddrs = swarm.resolve_host_maddrs(host_maddrs)
        self.announce_maddrs = swarm.parse_maddrs(announce_maddrs, "announce_maddrs")
        self.matchmaking_time = _positive_float(matchmaking_time, "matchmaking_time")
        self.averaging_timeout = _positive_float(averaging_timeout, "averaging_timeout")
        self.max_global_steps = swarm.resolve_max_global_steps(max_global_steps)
        #: peers in the parameter round at max_global_steps (0: it failed; None: not reached yet)
        self.final_round_group_size: Optional[int] = None
        if self.averaging_timeout <= self.matchmaking_time:
            raise ValueError(
                f"`averaging_timeout` ({averaging_timeout}) must be greater than `matchmaking_time` "
                f"({matchmaking_time}): a round first spends matchmaking_time gathering its group"
            )
        if batch_size is not None and (
            isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0
        ):
            raise ValueError(
                f"`batch_size` must be a positive integer or None (infer from batches), got {batch_size!r}"
            )
        self.batch_size = batch_size
        self.group_size = check_group_size(group_size)
        if _flag(delay_parameter_updates, "delay_parameter_updates") and _flag(local_updates, "local_updates"):
            raise ValueError(
                "`delay_parameter_updates=True` cannot be combined with `local_updates=True`: local updates already "
                "step every batch and average parameters in the background"
            )
        if local_updates and "grad_averager_factory" in optimizer_kwargs:
            raise ValueError(
                "`grad_averager_factory` has no effect with `local_updates=True`: no gradients are averaged"
            )
        self.delay_parameter_updates = _flag(delay_parameter_updates, "delay_parameter_updates")
        self.local_updates = _flag(local_updates, "local_updates")
        self.average_state_every = _positive_int(average_state_every, "average_state_every")
        make_compression(compression)  # validate the name now rather than at fit time
        self.compression = compression.lower()
        self.client_mode = _flag(client_mode, "client_mode")
        if identity_path is not None and not isinstance(identity_path, (str, os.PathLike)):
            raise TypeError(
                f"`identity_path` must be a file path (str or os.PathLike) or None, got {type(identity_path).__name__}"
            )
        self.identity_path = os.fspath(identity_path) if identity_path is not None else None
        self.min_peers = _positive_int(min_peers, "min_peers")
        self.min_peers_timeout = _positive_float(min_peers_timeout, "min_peers_timeout")
        self.bootstrap_timeout = _positive_float(bootstrap_timeout, "bootstrap_timeout")
        if join_command is not None and (not isinstance(join_command, str) or not join_command.strip()):
            raise ValueError(f"`join_command` must be a non-empty shell command or None, got {join_command!r}")
        self.join_command = join_command
        self.verbose = _flag(verbose, "verbose")
        self._swarm_secret = security.resolve_swarm_secret(swarm_secret)  # only its HMAC key is kept
        if self._swarm_secret is not None and "grad_averager_factory" in optimizer_kwargs:
            raise ValueError(
                "`grad_averager_factory` cannot be combined with `swarm_secret`: a private swarm builds its own "
                "gradient averager, which refuses peers without the secret"
            )
        self.clip = check_aggregation(aggregation, clip_tau, clip_iters, clip_drop)
        self.aggregation, self.clip_tau, self.clip_iters, self.clip_drop = aggregation, clip_tau, clip_iters, clip_drop
        if self.clip is not None and "grad_averager_factory" in optimizer_kwargs:
            raise ValueError(
                "`aggregation='centered_clip'` builds its own gradient averager; it cannot be combined with a custom "
                "`grad_averager_factory` (use lightning_moshpit.reducers.ClippedGradientAverager in your factory)"
            )
        self.optimizer_kwargs = check_optimizer_kwargs(optimizer_kwargs)
        self.parallel_devices: Optional[list[torch.device]] = None  # filled in by Lightning's accelerator connector

        self._dht: Optional[hivemind.DHT] = None
        self._swarm_optimizer: Optional[SwarmOptimizer] = None
        self._finished_rounds: list[AveragingRound] = []
        self._finished_global_step = 0
        self._addresses: list[str] = []
        self._left_swarm = False
        self._finished_samples = 0
        self._samples_since_step = 0
        self._epoch_times: deque[tuple[float, int]] = deque(maxlen=32)
        self._previous_sigint: Optional[Callable[..., Any]] = None
        self._metrics: Optional[MetricsPublisher] = None
        self._metrics_published_at = -float("inf")
        self._metrics_store: Any = None  # the future of the last metrics store

    # ------------------------------------------------------------------------------------------ registration
    @classmethod
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        strategy_registry.register(
            "moshpit", cls, description="Decentralized Moshpit averaging over a hivemind swarm", override=True
        )
        strategy_registry.register(
            "moshpit_dpu",
            cls,
            description="Moshpit averaging with delayed parameter updates (background averaging and optimizer step)",
            delay_parameter_updates=True,
            override=True,
        )

    # ------------------------------------------------------------------------------------------ swarm access
    @property
    def root_device(self) -> torch.device:
        if self.parallel_devices:
            return self.parallel_devices[0]
        return torch.device("cpu")

    @property
    def dht(self) -> hivemind.DHT:
        """This peer's hivemind DHT, started on first use (before or during fit); fit's teardown stops it."""
        if self._dht is None:
            if self._left_swarm:
                raise RuntimeError("This peer has left the swarm (fit ended); create a new MoshpitStrategy to rejoin")
            swarm.check_platform()
            self._dht = swarm.start_dht(
                initial_peers=self.initial_peers,
                host_maddrs=self.host_maddrs,
                announce_maddrs=self.announce_maddrs,
                client_mode=self.client_mode,
                identity_path=self.identity_path,
                startup_timeout=self.bootstrap_timeout,
                swarm_secret=self._swarm_secret,
            )
            self._addresses = swarm.visible_addresses(self._dht)
        return self._dht

    @property
    def peer_addresses(self) -> list[str]:
        """Multiaddrs other peers pass as ``initial_peers`` to join this swarm.

        Reading it before ``fit`` starts the DHT early, so a script can print or share the addresses first. After
        ``fit`` it returns the addresses this peer had; they no longer answer.
        """
        if self._dht is None and not self._left_swarm:
            _ = self.dht  # starts the DHT and records its addresses
        return list(self._addresses)

    @property
    def private(self) -> bool:
        """Whether this peer runs a private swarm (``swarm_secret`` or ``MOSHPIT_SWARM_SECRET`` was given)."""
        return self._swarm_secret is not None

    @property
    def swarm_optimizer(self) -> Optional[SwarmOptimizer]:
        """The collaborative optimizer while fitting, else ``None``."""
        return self._swarm_optimizer

    @property
    def global_step(self) -> int:
        """The swarm's global optimizer step (hivemind epoch) this peer is at; after fit, where it ended."""
        return self._swarm_optimizer.local_epoch if self._swarm_optimizer is not None else self._finished_global_step

    @property
    def samples_contributed(self) -> int:
        """Training samples this peer has reported to the swarm in the current (or last) fit."""
        return self._swarm_optimizer.samples_reported if self._swarm_optimizer is not None else self._finished_samples

    @property
    def num_peers(self) -> int:
        """Peers in the swarm as last seen by this peer (at least 1 while fitting)."""
        return self._swarm_optimizer.num_peers if self._swarm_optimizer is not None else 0

    @property
    def averaging_rounds(self) -> list[AveragingRound]:
        """Every gradient-averaging round this peer took part in during the current (or last) fit."""
        return list(self._swarm_optimizer.rounds) if self._swarm_optimizer is not None else list(self._finished_rounds)

    # ------------------------------------------------------------------------------------------ Lightning hooks
    def setup_optimizers(self, trainer: Trainer) -> None:
        super().setup_optimizers(trainer)
        if trainer.state.fn != TrainerFn.FITTING:
            return
        if len(self.optimizers) != 1:
            raise ValueError(
                f"MoshpitStrategy supports exactly one optimizer, but configure_optimizers returned "
                f"{len(self.optimizers)}. Combine parameter groups into one optimizer."
            )
        if self.parallel_devices and len(self.parallel_devices) > 1:
            rank_zero_warn(
                f"MoshpitStrategy runs one peer per process on one device; using {self.root_device} and ignoring "
                f"{len(self.parallel_devices) - 1} other device(s). Start one process per GPU to use them all."
            )
        scheduler = self._take_scheduler()
        self._left_swarm = False  # a new fit may join (or start) a swarm again
        in_main_thread = threading.current_thread() is threading.main_thread()
        sigint_before = signal.getsignal(signal.SIGINT) if in_main_thread else None
        self._swarm_optimizer = self._make_swarm_optimizer(self.optimizers[0], scheduler)
        if sigint_before is not None:
            # hivemind's DecentralizedAverager.run_in_background sets SIGINT to SIG_IGN in *this* process so its
            # child inherits it, and never restores it (hivemind/averaging/averager.py, line 334): without this,
            # Ctrl-C does nothing for the rest of the run.
            signal.signal(signal.SIGINT, sigint_before)
        self._swarm_optimizer.batch_size_source = self._take_sample_count
        self._metrics = MetricsPublisher(self.dht, self.run_id, expiration=max(60.0, self.averaging_timeout))
        self._install_interrupt_handler()
        self.optimizers = [self._swarm_optimizer]
        if self.initial_peers:
            rank_zero_info(f"[moshpit] run_id={self.run_id}; joined the swarm through {self.initial_peers[0]}")
        else:
            target = self.target_batch_size if self._target_from_env else None  # the newcomer needs the same value
            hint = swarm.join_command_hint(self.peer_addresses, self.run_id, self.join_command, target)
            rank_zero_info(f"[moshpit] run_id={self.run_id}; started a new swarm. {hint}")

    def on_train_start(self) -> None:
        """The start barrier, after Lightning restored any checkpoint: wait for peers, then catch up with the swarm."""
        super().on_train_start()
        if self._swarm_optimizer is None:
            return
        seen = self._swarm_optimizer.join_swarm(
            self.min_peers, self.min_peers_timeout, expect_others=bool(self.initial_peers)
        )
        rank_zero_info(f"[moshpit] started with {seen} peer(s) visible, at global step {self.global_step}")
        if self.max_global_steps is not None:
            self._lift_local_limits()
            self._swarm_optimizer.stop_at_epoch = self.max_global_steps
            self._stop_at_max_global_steps()

    def _lift_local_limits(self) -> None:
        """With ``max_global_steps``, the swarm's step ends the fit: lift the Trainer's local ``max_steps``/``max_epochs``."""
        trainer = self.lightning_module.trainer
        fit_loop = trainer.fit_loop
        lifted = [f"{name}={value}" for name, value in (("max_steps", fit_loop.epoch_loop.max_steps),
                                                          ("max_epochs", fit_loop.max_epochs)) if value not in (-1, None)]  # fmt: skip
        fit_loop.epoch_loop.max_steps = -1
        fit_loop.max_epochs = -1
        if lifted:
            rank_zero_info(f"[moshpit] max_global_steps={self.max_global_steps} ends this fit; ignoring the Trainer's "
                           f"{', '.join(lifted)} (they count local batches, which differ between peers)")  # fmt: skip

    def _stop_at_max_global_steps(self) -> None:
        """Ask Lightning to stop once the swarm reached ``max_global_steps``, with any delayed update applied first."""
        swarm_optimizer = self._swarm_optimizer
        if self.max_global_steps is None or swarm_optimizer is None or self.global_step < self.max_global_steps:
            return
        if self.final_round_group_size is not None:  # averaged already; Lightning stops after this batch
            self.lightning_module.trainer.should_stop = True
            return
        # the last update and parameter round may still run in the background (delayed updates, hivemind's delayed
        # state averaging): apply them, then average parameters once more with the peers that stop here too
        # late peers get two more averaging windows to join (see average_final_state)
        patience = 2 * (self.matchmaking_time + self.averaging_timeout)
        group = swarm_optimizer.average_final_state(timeout=self.averaging_timeout, patience=patience)
        peers = swarm_optimizer.num_peers
        message = (f"[moshpit] reached max_global_steps={self.max_global_steps}; final parameter round with {group} "
                   f"of {peers} peer(s)")  # fmt: skip
        if group < peers:
            log.warning(f"{message}: this peer's final parameters may differ from the others'")
        else:
            rank_zero_info(message)
        self.final_round_group_size = group
        self.lightning_module.trainer.should_stop = True

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        batch = args[0] if args else kwargs.get("batch")
        self._samples_since_step += self._batch_size_of(batch)
        return super().training_step(*args, **kwargs)

    def optimizer_step(
        self,
        optimizer: Any,
        closure: Callable[[], Any],
        model: Optional[Union[LightningModule, torch.nn.Module]] = None,
        **kwargs: Any,
    ) -> Any:
        swarm_optimizer = self._swarm_optimizer
        if swarm_optimizer is None:
            return super().optimizer_step(optimizer, closure, model, **kwargs)
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        self._log_swarm_metrics()
        self._publish_metrics(output)
        self._stop_at_max_global_steps()
        return output

    def teardown(self) -> None:
        """Leave the swarm: say goodbye to peers, stop averagers, the DHT and its p2pd daemon."""
        self._restore_interrupt_handler()
        self._finish_metrics()
        if self._swarm_optimizer is not None:
            self._finished_rounds = list(self._swarm_optimizer.rounds)
            self._finished_global_step = self._swarm_optimizer.local_epoch
            self._finished_samples = self._swarm_optimizer.samples_reported
            try:
                self._swarm_optimizer.shutdown()
            finally:
                self._swarm_optimizer = None
        self.teardown_dht()
        super().teardown()

    def teardown_dht(self) -> None:
        """Stop this peer's DHT and its p2pd daemon (``teardown`` does it after fit; a Trainer-less peer calls it)."""
        if self._dht is not None:
            self._dht.shutdown()
            self._dht.join(timeout=10)  # shutdown() may return before the DHT process (and its p2pd) is gone
            self._dht = None
            self._left_swarm = True

    # ------------------------------------------------------------------------------------------ helpers
    def _install_interrupt_handler(self) -> None:
        """Make Ctrl-C reliable during fit.

        hivemind wraps averaging in ``except BaseException`` and logs a ``KeyboardInterrupt`` that lands there as a
        failed round, so about half of all Ctrl-C presses were lost. The handler keeps the usual behaviour (it calls
        the previous handler, which raises ``KeyboardInterrupt``) and also flags the optimizer, whose ``step`` raises
        again once hivemind returns; Lightning then runs its normal interrupt path and ``teardown``.
        """
        if threading.current_thread() is not threading.main_thread():
            return
        previous = signal.getsignal(signal.SIGINT)
        if not callable(previous):
            return  # SIG_IGN / SIG_DFL: the process chose not to turn Ctrl-C into KeyboardInterrupt

        def on_interrupt(signum: int, frame: Any) -> None:
            if self._swarm_optimizer is not None:
                self._swarm_optimizer.interrupted = True
            previous(signum, frame)

        self._previous_sigint = previous
        signal.signal(signal.SIGINT, on_interrupt)

    def _restore_interrupt_handler(self) -> None:
        if self._previous_sigint is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous_sigint)
        self._previous_sigint = None

    def _take_sample_count(self) -> int:
        """Samples seen by ``training_step`` since the previous optimizer step (then reset to zero)."""
        count, self._samples_since_step = self._samples_since_step, 0
        return count

    def _batch_size_of(self, batch: Any) -> int:
        if self.batch_size is not None:
            return self.batch_size
        try:
            return extract_batch_size(batch)
        except Exception as error:
            raise ValueError(
                f"MoshpitStrategy could not infer the batch size from a batch of type {type(batch).__name__} "
                f"({error}); pass MoshpitStrategy(batch_size=...)"
            ) from None

    def _take_scheduler(self) -> Optional[Any]:
        """Hand the (single) LR scheduler to hivemind, which steps it once per *global* step.

        Lightning keeps a view whose ``step`` does nothing, so the scheduler is not also stepped per local batch.
        """
        if not self.lr_scheduler_configs:
            return None
        if len(self.lr_scheduler_configs) > 1:
            raise ValueError("MoshpitStrategy supports at most one learning-rate scheduler")
        config = self.lr_scheduler_configs[0]
        if isinstance(config.scheduler, ReduceLROnPlateau):
            raise ValueError(
                "MoshpitStrategy does not support ReduceLROnPlateau: schedulers step once per global step on every "
                "peer, and a monitored metric differs between peers. Use a step-based scheduler instead."
            )
        scheduler = config.scheduler
        config.scheduler = GlobalStepScheduler(scheduler)
        return scheduler

    def _make_swarm_optimizer(self, optimizer: torch.optim.Optimizer, scheduler: Optional[Any]) -> SwarmOptimizer:
        return self.build_swarm_optimizer(self.lightning_module, optimizer, scheduler)

    def build_swarm_optimizer(
        self,
        module: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Optional[Any] = None,
        auxiliary: bool = False,
    ) -> SwarmOptimizer:
        """Wrap ``optimizer`` (built over ``module``'s parameters) in this strategy's :class:`SwarmOptimizer`.

        ``fit`` calls it for you. It is public for processes that take part in the swarm without a Trainer: an
        auxiliary peer (``auxiliary=True``, see :mod:`lightning_moshpit.auxiliary`) builds exactly the averagers a
        training peer builds, so their tensor schemas match and hivemind lets it into the same groups.
        """
        named_buffers = [(name, buffer) for name, buffer in module.named_buffers() if buffer.is_floating_point()]
        names_by_id = {id(parameter): name for name, parameter in module.named_parameters()}
        parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]]
        param_names = [names_by_id.get(id(parameter), f"parameter {i}") for i, parameter in enumerate(parameters)]
        signature = ModelSignature.of(list(zip(param_names, parameters)) + named_buffers)
        compression = make_compression(self.compression)
        kwargs = dict(self.optimizer_kwargs)
        averager_opts = averager_options(self.group_size, self.matchmaking_time)
        averager_opts.update(kwargs.pop("averager_opts", None) or {})
        # Refresh the swarm's progress often relative to matchmaking: a stale view makes a peer count only its own
        # samples toward target_batch_size and overshoot it. A peer that stops reporting (crashed, paused) drops out
        # of the swarm's count after averaging_timeout instead of hivemind's fixed 60 s.
        tracker_opts = dict(
            default_refresh_period=min(0.5, self.matchmaking_time / 4),
            min_refresh_period=min(0.5, self.matchmaking_time / 20),
            max_refresh_period=max(0.25, self.matchmaking_time / 4),
            metadata_expiration=self.averaging_timeout,
        )
        tracker_opts.update(kwargs.pop("tracker_opts", None) or {})
        # hivemind bans a sender that is `next_chunk_timeout` late with its next chunk and finishes the all-reduce
        # without its part; its default (matchmaking_time) excluded live peers on a busy CPU. A third of the
        # averaging timeout still leaves a dead peer's round time to end within averaging_timeout.
        kwargs.setdefault("next_chunk_timeout", max(self.matchmaking_time, self.averaging_timeout / 3))
        dpu = self.delay_parameter_updates
        if dpu:
            kwargs.setdefault("offload_optimizer", True)
        if not self.local_updates and "grad_averager_factory" not in kwargs:
            # hivemind forwards averager_opts to the state averager only; the gradient averager needs them too
            kwargs["grad_averager_factory"] = gradient_averager_factory(
                self.clip, swarm_secret=self._swarm_secret, **averager_opts
            )
        return SwarmOptimizer(
            group_size=self.group_size,
            param_names=param_names,
            model_signature=signature,
            swarm_secret=self._swarm_secret,
            dht=self.dht,
            run_id=self.run_id,
            target_batch_size=self.target_batch_size,
            optimizer=optimizer_factory(optimizer),
            params=[dict(group) for group in optimizer.param_groups],
            scheduler=rebinding_scheduler_factory(scheduler) if scheduler is not None else None,
            matchmaking_time=self.matchmaking_time,
            averaging_timeout=self.averaging_timeout,
            delay_optimizer_step=dpu,
            delay_grad_averaging=dpu,
            use_local_updates=self.local_updates,
            # An auxiliary peer lends its bandwidth to gradient rounds only: a state round blocks its loop for a whole
            # matchmaking, so it missed every other gradient round (2 of 3 members in half the rounds, measured)
            average_state_every=self.average_state_every if not auxiliary else AUXILIARY_STATE_AVERAGING_OFF,
            client_mode=self.client_mode,
            grad_compression=compression,
            state_averaging_compression=compression,
            extra_tensors=[buffer for _, buffer in named_buffers],
            averager_opts=averager_opts,
            tracker_opts=tracker_opts,
            verbose=self.verbose,
            auxiliary=auxiliary,
            clip=self.clip,
            **kwargs,
        )

    def _log_swarm_metrics(self) -> None:
        swarm_optimizer = self._swarm_optimizer
        module = self.lightning_module
        if swarm_optimizer is None or module is None or module._current_fx_name is None:
            return
        now, epoch = time.monotonic(), swarm_optimizer.local_epoch
        if not self._epoch_times or self._epoch_times[-1][1] != epoch:
            self._epoch_times.append((now, epoch))
        metrics = {
            "moshpit/num_peers": float(swarm_optimizer.num_peers),
            "moshpit/global_step": float(epoch),
        }
        module.log_dict(metrics, prog_bar=True, on_step=True, on_epoch=False, batch_size=1)
        extra: dict[str, float] = {}
        (first_time, first_epoch), (last_time, last_epoch) = self._epoch_times[0], self._epoch_times[-1]
        if last_epoch > first_epoch and last_time > first_time:
            extra["moshpit/samples_per_second"] = (
                self.target_batch_size * (last_epoch - first_epoch) / (last_time - first_time)
            )
        if isinstance(swarm_optimizer.tracker, SwarmProgressTracker):
            extra["moshpit/rejected_records"] = float(swarm_optimizer.tracker.implausible_records)
        rounds = swarm_optimizer.rounds
        if rounds:
            extra["moshpit/averaging_success_rate"] = sum(r.succeeded for r in rounds) / len(rounds)
            extra["moshpit/group_size"] = float(rounds[-1].group_size)
        if extra:
            module.log_dict(extra, on_step=True, on_epoch=False, batch_size=1)


    def _publish_metrics(self, loss: Any) -> None:
        """Store this peer's loss, global step and role as a signed DHT record for ``lightning-moshpit status``.

        hivemind's progress record already carries samples/s and the step; the loss (and the role) is what a monitor
        cannot get otherwise. At most one store per :data:`METRICS_PERIOD` seconds, without waiting for the DHT.
        """
        now = time.monotonic()
        if self._metrics is None or self._swarm_optimizer is None or now - self._metrics_published_at < METRICS_PERIOD:
            return
        self._metrics_published_at = now
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) and loss.numel() == 1 else None
        self._metrics_store = self._metrics.publish(
            step=self._swarm_optimizer.local_epoch,
            loss=value,
            target_batch_size=self.target_batch_size,
            role="client" if self.client_mode else "trainer",
        )

    def _finish_metrics(self) -> None:
        """Let the last metrics store finish before the DHT stops (it is informative: never fail over it)."""
        store, self._metrics_store, self._metrics = self._metrics_store, None, None
        self._metrics_published_at = -float("inf")
        if store is not None:
            try:
                store.result(timeout=5.0)
            except Exception as error:
                log.debug(f"Last metrics record not stored: {error!r}")


def _positive_float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
        raise ValueError(f"`{name}` must be a positive, finite number of seconds, got {value!r}")
    return float(value)


def _flag(value: Any, name: str) -> bool:
    # bool("no") is True: a string or a number here is a configuration mistake, not a flag
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be True or False, got {value!r} ({type(value).__name__})")
    return value


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
    return value
