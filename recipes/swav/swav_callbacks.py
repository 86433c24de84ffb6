"""Callbacks the recipe always adds (``--progress.*`` and ``--probe.*`` on the command line).

- :class:`SwarmProgress` prints the exact command that joins this peer's swarm, a plain progress line every few
  local steps, and can write the loss of every global step to a JSON file.
- :class:`LinearProbe` measures how good the learned features are: after fit (and, for comparison, before), it
  trains a linear classifier on frozen backbone features of the labelled probe split and reports its accuracy on the
  held-out split with torchmetrics.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_moshpit import MoshpitStrategy
from lightning_moshpit.swarm import join_command_hint


def swarm_global_step(trainer: L.Trainer) -> int:
    """The swarm's global optimizer step under ``MoshpitStrategy``; Lightning's step counter otherwise."""
    strategy = trainer.strategy
    return strategy.global_step if isinstance(strategy, MoshpitStrategy) else trainer.global_step


class SwarmProgress(L.Callback):
    """Join command, progress lines and the loss history of this peer.

    Args:
        every: Print one line every this many local steps (0: never).
        history_file: Write ``{"global_step": [...], "loss": [...], ...}`` here after fit: this peer's mean training
            loss over the local batches of each global step.
        command: The command line this peer was started with, for the join hint (``train.py`` fills it in).
    """

    def __init__(self, every: int = 10, history_file: Optional[str] = None, command: Optional[str] = None) -> None:
        self.every, self.history_file, self.command = every, history_file, command
        self.losses: dict[int, list[float]] = defaultdict(list)
        self.started: Optional[float] = None
        self._step_at_batch_start = 0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        strategy = trainer.strategy
        if isinstance(strategy, MoshpitStrategy) and not strategy.initial_peers:
            command = self.command or "python recipes/swav/train.py fit"
            hint = join_command_hint(strategy.peer_addresses, strategy.run_id).replace("python <your script>", command)
            print(f"[swav] started a new swarm. {hint}", flush=True)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.started is None:
            self.started = time.monotonic()
        self._step_at_batch_start = swarm_global_step(trainer)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = float(outputs["loss"])
        self.losses[self._step_at_batch_start].append(loss)
        if self.every and trainer.global_step % self.every == 0:
            peers = getattr(trainer.strategy, "num_peers", 1)
            elapsed = time.monotonic() - (self.started or time.monotonic())
            print(f"[swav] local step {trainer.global_step:5d} | loss {loss:.4f} | peers {peers} | "
                  f"global step {swarm_global_step(trainer)} | {elapsed:.0f} s", flush=True)  # fmt: skip

    def history(self) -> dict[str, list]:
        steps = sorted(self.losses)
        return {
            "global_step": steps,
            "loss": [sum(self.losses[s]) / len(self.losses[s]) for s in steps],
            "local_batches": [len(self.losses[s]) for s in steps],
        }

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.history_file:
            write_json(Path(self.history_file), self.history())


class LinearProbe(L.Callback):
    """Held-out accuracy of a linear classifier on frozen backbone features (SwAV's standard evaluation).

    The probe uses the data module's ``probe_datasets()``: labelled, un-augmented images. The features are
    standardised with the probe-train statistics and a ``nn.Linear`` is trained on them with full-batch L-BFGS;
    accuracy on the held-out split is computed with ``torchmetrics.classification.MulticlassAccuracy``.

    Args:
        enabled: Run the probe at all.
        baseline: Also probe the randomly initialised backbone before training, so the gain is visible.
        max_iterations: L-BFGS iterations of the linear classifier.
        weight_decay: L2 penalty of the classifier.
        batch_size: Images per batch when extracting features.
        report_file: Write ``{"accuracy": ..., "baseline_accuracy": ..., ...}`` here.
    """

    def __init__(
        self,
        enabled: bool = True,
        baseline: bool = True,
        max_iterations: int = 200,
        weight_decay: float = 1e-4,
        batch_size: int = 256,
        report_file: Optional[str] = None,
    ) -> None:
        self.enabled, self.baseline = enabled, baseline
        self.max_iterations, self.weight_decay, self.batch_size = max_iterations, weight_decay, batch_size
        self.report_file = report_file
        self.results: dict[str, Any] = {}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.enabled and self.baseline:
            self.results["baseline_accuracy"] = self.evaluate(trainer, pl_module)
            print(f"[swav] linear probe, randomly initialised backbone: {self.results['baseline_accuracy']:.3f}", flush=True)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled:
            return
        self.results["accuracy"] = self.evaluate(trainer, pl_module)
        self.results["global_step"] = swarm_global_step(trainer)
        baseline = self.results.get("baseline_accuracy")
        versus = f" (randomly initialised backbone: {baseline:.3f})" if baseline is not None else ""
        print(f"[swav] linear probe held-out accuracy after {self.results['global_step']} global steps: "
              f"{self.results['accuracy']:.3f}{versus}", flush=True)  # fmt: skip
        if self.report_file:
            write_json(Path(self.report_file), self.results)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float:
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "probe_datasets"):
            raise TypeError("LinearProbe needs a data module with probe_datasets() (the recipe's ImageFolderData)")
        train, heldout = datamodule.probe_datasets()
        backbone = pl_module.backbone
        was_training, home = backbone.training, next(backbone.parameters()).device
        device = trainer.strategy.root_device  # after fit, Lightning has moved the module back to the CPU
        backbone.to(device).eval()
        try:
            train_x, train_y = self._features(backbone, train, device)
            test_x, test_y = self._features(backbone, heldout, device)
        finally:
            backbone.to(home).train(was_training)
        num_classes = int(max(train_y.max(), test_y.max())) + 1
        mean, std = train_x.mean(dim=0), train_x.std(dim=0) + 1e-6
        classifier = fit_linear_classifier((train_x - mean) / std, train_y, num_classes, self.max_iterations,
                                           self.weight_decay)  # fmt: skip
        accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro").to(test_x.device)
        with torch.no_grad():
            accuracy.update(classifier((test_x - mean) / std).argmax(dim=1), test_y)
        return float(accuracy.compute())

    @torch.no_grad()
    def _features(self, backbone: nn.Module, dataset: Dataset, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        features, labels = [], []
        for images, targets in DataLoader(dataset, batch_size=self.batch_size):
            features.append(backbone(images.to(device)).float())
            labels.append(targets.to(device))
        return torch.cat(features), torch.cat(labels)


def fit_linear_classifier(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, max_iterations: int, weight_decay: float
) -> nn.Linear:
    """A linear softmax classifier fitted to all the features at once (full-batch L-BFGS, cross-entropy + L2)."""
    classifier = nn.Linear(features.shape[1], num_classes).to(features.device)
    optimizer = torch.optim.LBFGS(classifier.parameters(), max_iter=max_iterations, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(classifier(features), labels)
        loss = loss + weight_decay * classifier.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return classifier


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` so that a reader polling for ``path`` never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
