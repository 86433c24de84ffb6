"""Auxiliary peers: take part in the swarm's averaging without computing gradients (as in DeDLOC).

A machine with bandwidth and CPU but no accelerator can still help: in every averaging round each group member
reduces one part of the averaged vector (hivemind's butterfly all-reduce), so one more member makes every part
smaller. hivemind supports this as ``auxiliary=True``: the averager joins groups in ``AveragingMode.AUX``, sends no
tensors of its own (its weight is zero, so the average is unchanged) and only reduces the part it is given.

hivemind admits a peer into a group only if its tensors have the same shapes as everybody else's (the *schema
hash*), so an auxiliary peer must build the very averagers a training peer builds. It therefore takes the same
LightningModule (to know the parameters, buffers and optimizer state) and the same :class:`MoshpitStrategy`
settings, and asks the strategy to build its :class:`SwarmOptimizer` with ``auxiliary=True``.

Run it from the command line (``lightning-moshpit aux --model my_package.module:MyModule ...``) or from Python::

    strategy = MoshpitStrategy(target_batch_size=4096, initial_peers=[...], run_id="my_run")
    run_auxiliary(MyModule(), strategy, stop=threading.Event())
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import random
import signal
import threading
import time
from typing import Any, Optional, Protocol

import torch

from lightning_moshpit.averaging import grid_group_bits
from lightning_moshpit.monitor import MetricsPublisher
from lightning_moshpit.optimizer import SwarmOptimizer
from lightning_moshpit.strategy import MoshpitStrategy

log = logging.getLogger(__name__)


class StopSignal(Protocol):
    """Anything with ``is_set()`` (a ``threading.Event``, the CLI's signal flag)."""

    def is_set(self) -> bool: ...


@dataclasses.dataclass
class AuxiliaryReport:
    """What an auxiliary peer did before it stopped."""

    global_step: int  #: the swarm's global step when it stopped
    rounds: int  #: gradient-averaging rounds it was in (successful ones)
    attempts: int  #: gradient-averaging rounds it tried


def load_module(spec: str, init_args: Optional[str] = None) -> torch.nn.Module:
    """Build a model from ``"package.module:Name"`` (a class or a factory) and JSON keyword arguments.

    Raises ``ValueError`` naming ``--model`` / ``--model-args`` for a malformed spec, a missing attribute or bad JSON.
    """
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"`--model` must look like 'package.module:ClassOrFactory', got {spec!r}")
    try:
        kwargs = json.loads(init_args) if init_args else {}
    except json.JSONDecodeError as error:
        raise ValueError(f"`--model-args` must be a JSON object, got {init_args!r} ({error})") from None
    if not isinstance(kwargs, dict):
        raise ValueError(f"`--model-args` must be a JSON object, got {init_args!r}")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"`--model` {spec!r} could not be loaded: {type(error).__name__}: {error}") from None
    model = factory(**kwargs)
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"`--model` {spec!r} built a {type(model).__name__}, not a torch.nn.Module")
    return model


def first_optimizer(module: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer ``module.configure_optimizers()`` returns (any of Lightning's return forms), without schedulers."""
    configured: Any = module.configure_optimizers()  # type: ignore[operator]
    if isinstance(configured, dict):
        configured = configured["optimizer"]
    if isinstance(configured, (list, tuple)) and configured:
        configured = configured[0]
        if isinstance(configured, (list, tuple)):
            configured = configured[0]
        if isinstance(configured, dict):
            configured = configured["optimizer"]
    if not isinstance(configured, torch.optim.Optimizer):
        raise ValueError(f"configure_optimizers() must return an optimizer, got {type(configured).__name__}")
    return configured


def run_auxiliary(
    module: torch.nn.Module,
    strategy: MoshpitStrategy,
    stop: StopSignal,
    poll_period: float = 0.1,
) -> AuxiliaryReport:
    """Assist the swarm's averaging until ``stop`` is set; then leave it cleanly (averagers, DHT and p2pd stopped).

    The loop is hivemind's auxiliary loop: ``optimizer.step()`` with no closure books a group when the swarm is about
    to reach ``target_batch_size`` and reduces its part of the round. The peer also publishes a metrics record with
    ``role="aux"`` so ``lightning-moshpit status`` and the dashboard list it.
    """
    optimizer: Optional[SwarmOptimizer] = None
    try:
        in_main_thread = threading.current_thread() is threading.main_thread()
        sigint_before = signal.getsignal(signal.SIGINT) if in_main_thread else None
        optimizer = strategy.build_swarm_optimizer(module, first_optimizer(module), auxiliary=True)
        if sigint_before is not None:  # hivemind's averagers set SIGINT to SIG_IGN here (see MoshpitStrategy)
            signal.signal(signal.SIGINT, sigint_before)
        optimizer.check_model_signature()  # a different model would never match the swarm's schema: say so now
        optimizer.refresh_progress(timeout=max(1.0, strategy.matchmaking_time))
        peers = max(1, optimizer.num_peers)
        optimizer.set_group_bits(grid_group_bits(random.randrange(peers), peers, strategy.group_size))
        metrics = MetricsPublisher(strategy.dht, strategy.run_id, expiration=max(60.0, strategy.averaging_timeout))
        log.info(f"[moshpit] auxiliary peer {strategy.dht.peer_id} assists run_id={strategy.run_id}")
        published_at = -float("inf")
        while not stop.is_set():
            optimizer.step()
            if time.monotonic() - published_at > 1.0:
                metrics.publish(step=optimizer.local_epoch, role="aux", target_batch_size=strategy.target_batch_size)
                published_at = time.monotonic()
            time.sleep(poll_period)
        rounds = optimizer.rounds
        return AuxiliaryReport(
            global_step=optimizer.local_epoch,
            rounds=sum(r.succeeded for r in rounds),
            attempts=len(rounds),
        )
    finally:
        if optimizer is not None:
            optimizer.shutdown()
        strategy.teardown_dht()
