"""The linear probe the recipe always adds (``--probe.*`` on the command line).

The join line and the progress lines come from ``lightning_moshpit.lightning_cli`` (``--progress.*``).
:class:`LinearProbe` measures how good the learned features are: after fit (and, for comparison, before), it trains
a linear classifier on frozen backbone features of the labelled probe split and reports its accuracy on the held-out
split with torchmetrics.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_moshpit.lightning_cli import SwarmProgress


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
        self.results["global_step"] = SwarmProgress.global_step(trainer)
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
