"""Byzantine peers for tests and benchmarks: what a malicious or broken peer sends into gradient averaging.

An honest peer accumulates its gradients, copies them into its gradient averager's buffers (hivemind's
``GradientAverager.load_accumulators_into_averager_``), and the all-reduce sends those buffers' pieces to the other
peers. :func:`install_gradient_attack` replaces that copy on one peer with a corrupted one, so the bad vector travels
through the real averaging, *after* the peer's own safety checks (e.g. the non-finite guard that drops a NaN batch,
which an attacker would simply not run). The peer still applies whatever the group sends back, like anyone else.

Attacks (``ATTACKS``), on the vector ``g`` the peer would honestly send:

- ``sign_flip``: ``-scale · g`` (with the default scale 1000: the issue's "sign flip ×(−1000)");
- ``gaussian``: random Gaussian noise of norm ``scale · ‖g‖``;
- ``nan``: every value NaN;
- ``constant``: one fixed random direction, norm ``scale · ‖g‖``, the same direction every round;
- ``label_flip``: trains on wrong labels (``label -> num_classes - 1 - label``); the gradient is sent unchanged, so
  the corruption happens in the data (see :func:`flip_labels`), not here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable

import torch

#: Every attack the test peer knows; ``"none"`` is an honest peer.
ATTACKS = ("none", "sign_flip", "gaussian", "label_flip", "nan", "constant")
#: Attacks that corrupt the sent gradient (``label_flip`` corrupts the data instead).
GRADIENT_ATTACKS = ("sign_flip", "gaussian", "nan", "constant")


def corrupt(tensors: Sequence[torch.Tensor], attack: str, scale: float, generator: torch.Generator,
            direction: Sequence[torch.Tensor] = ()) -> None:  # fmt: skip
    """Overwrite ``tensors`` (the vector about to be averaged) in place with the attack's vector."""
    with torch.no_grad():
        norm = float(torch.sqrt(sum((t.float() ** 2).sum() for t in tensors))) or 1.0
        if attack == "sign_flip":
            for tensor in tensors:
                tensor.mul_(-scale)
        elif attack == "nan":
            for tensor in tensors:
                tensor.fill_(float("nan"))
        elif attack in ("gaussian", "constant"):
            noise = list(direction) if attack == "constant" else [
                torch.randn(t.shape, generator=generator) for t in tensors
            ]  # fmt: skip
            noise_norm = float(torch.sqrt(sum((n**2).sum() for n in noise))) or 1.0
            for tensor, values in zip(tensors, noise):
                tensor.copy_(values * (scale * norm / noise_norm))
        else:
            raise ValueError(f"unknown gradient attack {attack!r}; expected one of {list(GRADIENT_ATTACKS)}")


def install_gradient_attack(grad_averager: Any, attack: str, scale: float = 1000.0, seed: int = 0) -> None:
    """Make ``grad_averager`` (a hivemind ``GradientAverager``) send the attack's vector instead of its gradients."""
    if attack not in GRADIENT_ATTACKS:
        raise ValueError(f"`attack` must be one of {list(GRADIENT_ATTACKS)}, got {attack!r}")
    generator = torch.Generator().manual_seed(seed)
    honest_load: Callable[[], None] = grad_averager.load_accumulators_into_averager_
    with grad_averager.get_tensors() as tensors:
        direction = [torch.randn(t.shape, generator=generator) for t in tensors]

    def load_corrupted() -> None:
        honest_load()
        with grad_averager.get_tensors() as tensors:
            corrupt(tensors, attack, scale, generator, direction)

    grad_averager.load_accumulators_into_averager_ = load_corrupted


def flip_labels(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The label-flipping attack's training labels: class ``c`` becomes ``num_classes - 1 - c``."""
    return num_classes - 1 - labels
