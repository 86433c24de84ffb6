"""How a user's torch optimizer and LR scheduler are handed to hivemind, and which extra arguments pass through.

hivemind rebuilds the optimizer itself (to offload it or run it in the background) and steps the scheduler once per
*global* step. Lightning, meanwhile, would step the scheduler per local batch. These small adapters bridge the two.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import hivemind
import torch


class GlobalStepScheduler:
    """What Lightning sees of a scheduler that hivemind steps once per global step: ``step()`` does nothing here.

    Everything else (``get_last_lr``, ``state_dict`` for checkpoints, ...) is forwarded to the real scheduler.
    """

    def __init__(self, scheduler: Any) -> None:
        self.__dict__["scheduler"] = scheduler

    def step(self, *args: Any, **kwargs: Any) -> None:
        """Ignored: hivemind steps the scheduler when the swarm completes a global step."""

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["scheduler"], name)


def optimizer_factory(optimizer: torch.optim.Optimizer) -> Callable[[Any], torch.optim.Optimizer]:
    """A callable that rebuilds ``optimizer``'s class with its hyperparameters on new parameters.

    hivemind needs a factory (not an instance) to offload the optimizer or run it in the background. Keys of
    ``optimizer.defaults`` that the constructor does not accept (e.g. internal flags) are dropped.
    """
    cls = type(optimizer)
    signature = inspect.signature(cls.__init__)
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
    defaults = {k: v for k, v in optimizer.defaults.items() if accepts_any or k in signature.parameters}

    def make(params: Any) -> torch.optim.Optimizer:
        return cls(params, **defaults)

    return make


def rebinding_scheduler_factory(scheduler: Any) -> Callable[[torch.optim.Optimizer], Any]:
    """hivemind rebuilds the optimizer; point the user's scheduler at the rebuilt one instead of recreating it."""

    def make(optimizer: torch.optim.Optimizer) -> Any:
        scheduler.optimizer = optimizer
        return scheduler

    return make


_OWN_OPTIMIZER_KWARGS = {
    "dht", "run_id", "target_batch_size", "optimizer", "params", "scheduler", "matchmaking_time", "averaging_timeout",
    "use_local_updates", "average_state_every", "client_mode", "grad_compression", "state_averaging_compression",
    "extra_tensors", "verbose", "batch_size_per_step", "delay_optimizer_step", "delay_grad_averaging",
}  # fmt: skip


def check_optimizer_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Reject keyword arguments that neither MoshpitStrategy nor ``hivemind.Optimizer`` understands."""
    accepted = set(inspect.signature(hivemind.Optimizer.__init__).parameters) - {"self"} - _OWN_OPTIMIZER_KWARGS
    if kwargs.get("reuse_grad_buffers"):
        raise ValueError(
            "`reuse_grad_buffers=True` is not supported: Lightning zeroes gradients between steps, which hivemind "
            "forbids in that mode. Leave it False (gradients are accumulated in hivemind's own buffers)."
        )
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        owned = sorted(set(kwargs) & _OWN_OPTIMIZER_KWARGS)
        hint = f" ({owned} are set through MoshpitStrategy's own arguments)" if owned else ""
        raise TypeError(
            f"MoshpitStrategy got unexpected keyword argument(s) {unknown}{hint}. Extra keyword arguments go to "
            f"hivemind.Optimizer, which accepts: {sorted(accepted)}"
        )
    return kwargs
