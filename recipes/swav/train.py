"""SwAV self-supervised pretraining of a timm ResNet over a swarm (the DeDLOC SwAV setup), with LightningCLI.

Run one peer; it starts a swarm and prints the exact command that joins it::

    python recipes/swav/train.py fit --tiny                      # generated images, a narrow ResNet-18, CPU
    python recipes/swav/train.py fit --data.root /data/imagenet/train --data.heldout_root /data/imagenet/val

``configs/full.yaml`` (DeDLOC's ResNet-50 settings) is always read first; ``--tiny`` is short for
``--config recipes/swav/configs/tiny.yaml``, which overrides it (``lightning_moshpit.lightning_cli.SwarmCLI``). Any other setting can be given on the command line
(``--model.lr 1.2``, ``--trainer.strategy.init_args.target_batch_size 8192``, ...); ``--print_config`` shows them
all. With ``MOSHPIT_INITIAL_PEERS`` (or ``--trainer.strategy.init_args.initial_peers``) the peer joins a swarm.
Several peers on this machine: ``lightning-moshpit local 2 -- python recipes/swav/train.py fit --tiny``.

The method itself is in ``swav.py``, the data in ``multicrop.py``, the linear probe in ``swav_callbacks.py``; the
join line, the progress lines (``--progress.*``) and the shorthand come from ``lightning_moshpit.lightning_cli``. See
README.md beside this file.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, Optional

import lightning as L
import timm
import torch
from lightning.pytorch.cli import LightningArgumentParser, SaveConfigCallback
from multicrop import ImageFolderData
from swav import FeatureQueue, SwAVHead, swav_loss
from swav_callbacks import LinearProbe
from timm.optim import Lars
from torch.optim.lr_scheduler import LambdaLR

import lightning_moshpit  # noqa: F401  (registers the "moshpit" strategy names)
from lightning_moshpit.lightning_cli import SwarmCLI, SwarmProgress

HERE = Path(__file__).resolve().parent
FULL_CONFIG = HERE / "configs" / "full.yaml"
TINY_CONFIG = HERE / "configs" / "tiny.yaml"


def learning_rate(step: int, lr: float, warmup_start_lr: float, final_lr: float, warmup_steps: int,
                  total_steps: int) -> float:  # fmt: skip
    """DeDLOC's schedule, per *global* step: linear warm-up from ``warmup_start_lr`` to ``lr``, then a cosine to
    ``final_lr`` at ``total_steps``."""
    if step < warmup_steps:
        return warmup_start_lr + (lr - warmup_start_lr) * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final_lr + 0.5 * (lr - final_lr) * (1 + math.cos(math.pi * progress))


def _factor(step: int, frozen_until: int = 0, **schedule: Any) -> float:
    """``LambdaLR`` multiplier: the schedule over the base ``lr``, and 0 while a group is frozen."""
    return 0.0 if step < frozen_until else learning_rate(step, **schedule) / schedule["lr"]


class SwAV(L.LightningModule):
    """A timm backbone trained with SwAV (see ``swav.py`` for the method).

    Steps are counted in *global* steps (the swarm's optimizer steps, ``MoshpitStrategy.global_step``): the LR
    schedule, the prototype freeze, the queue start and the end of training are the same on every peer, however
    many local batches each one computes.

    Args:
        backbone: Any timm model name (random init); its pooled features feed the head.
        backbone_kwargs: Extra ``timm.create_model`` arguments, e.g. ``{"channels": [16, 32, 64, 128]}``.
        hidden_dim, output_dim, num_prototypes: See ``swav.SwAVHead``.
        temperature: Softmax temperature of the swapped predictions.
        epsilon, sinkhorn_iterations: Sinkhorn-Knopp entropy weight and iterations.
        assign_views: Views (indices into the crops, large crops first) whose codes are computed.
        queue_length: Embeddings of previous local batches kept per assigned view (0: no queue).
        queue_start_step: Global step from which the (full) queue joins Sinkhorn.
        freeze_prototypes_steps: The prototypes do not move before this global step.
        lr, warmup_start_lr, final_lr, warmup_steps: LR schedule (see :func:`learning_rate`); ``lr`` is the peak.
        max_global_steps: Length of the schedule; training stops there (the CLI links it to
            ``--progress.max_global_steps``, so every peer stops at the same global step).
        momentum, weight_decay, trust_coefficient: LARS (``timm.optim.Lars``, adapting every tensor as SwAV's LARC
            with ``clip=False``).
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        backbone_kwargs: Optional[dict[str, Any]] = None,
        hidden_dim: int = 2048,
        output_dim: int = 128,
        num_prototypes: int = 3000,
        temperature: float = 0.1,
        epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
        assign_views: Sequence[int] = (0, 1),
        queue_length: int = 3840,
        queue_start_step: int = 600,
        freeze_prototypes_steps: int = 40,
        lr: float = 2.4,
        warmup_start_lr: float = 0.3,
        final_lr: float = 0.0048,
        warmup_steps: int = 500,
        max_global_steps: int = 5000,
        momentum: float = 0.9,
        weight_decay: float = 1e-6,
        trust_coefficient: float = 0.001,
    ) -> None:
        super().__init__()
        if max_global_steps < 1:
            raise ValueError(f"`max_global_steps` must be at least 1, got {max_global_steps!r}")
        if not assign_views or min(assign_views) < 0:
            raise ValueError(f"`assign_views` must list view indices (SwAV: [0, 1]), got {list(assign_views)!r}")
        self.save_hyperparameters()
        self.backbone = timm.create_model(backbone, pretrained=False, num_classes=0, **(backbone_kwargs or {}))
        self.head = SwAVHead(self.backbone.num_features, hidden_dim, output_dim, num_prototypes)
        self.queue: Optional[FeatureQueue] = None

    def forward(self, views: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings and prototype scores of all views; views of one resolution go through the backbone together."""
        features, start = [], 0
        while start < len(views):
            end = start + 1
            while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
                end += 1
            features.append(self.backbone(torch.cat(list(views[start:end]))))
            start = end
        return self.head(torch.cat(features))

    def training_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        if max(hp.assign_views) >= len(batch):
            raise ValueError(f"`assign_views` {list(hp.assign_views)} names views beyond the {len(batch)} crops")
        self.head.normalize_prototypes()
        embeddings, scores = self(batch)
        if hp.queue_length > 0 and self.queue is None:
            self.queue = FeatureQueue(len(hp.assign_views), hp.queue_length, hp.output_dim, device=self.device)
        step = SwarmProgress.global_step(self.trainer)
        loss = swav_loss(embeddings, scores, batch[0].shape[0], hp.assign_views, self.head.prototypes.weight,
                         hp.temperature, hp.epsilon, hp.sinkhorn_iterations, queue=self.queue,
                         use_queue=step >= hp.queue_start_step)  # fmt: skip
        self.log("train_loss", loss)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # The frozen group's learning rate is 0 already; dropping its gradient also keeps momentum clean (SwAV sets
        # the gradient to None; hivemind accumulates every parameter's gradient, so zero it instead).
        if SwarmProgress.global_step(self.trainer) < self.hparams.freeze_prototypes_steps:
            grad = self.head.prototypes.weight.grad
            if grad is not None:
                grad.zero_()

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        prototypes = list(self.head.prototypes.parameters())
        prototype_ids = {id(p) for p in prototypes}
        others = [p for p in self.parameters() if id(p) not in prototype_ids]
        optimizer = Lars([{"params": others}, {"params": prototypes}], lr=hp.lr, momentum=hp.momentum,
                         weight_decay=hp.weight_decay, trust_coeff=hp.trust_coefficient, always_adapt=True)  # fmt: skip
        schedule = dict(lr=hp.lr, warmup_start_lr=hp.warmup_start_lr, final_lr=hp.final_lr,
                        warmup_steps=hp.warmup_steps, total_steps=hp.max_global_steps)  # fmt: skip
        factors = [partial(_factor, **schedule), partial(_factor, frozen_until=hp.freeze_prototypes_steps, **schedule)]
        # MoshpitStrategy hands the scheduler to hivemind, which steps it once per global step.
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": LambdaLR(optimizer, factors), "interval": "step"}}


class SaveConfigBesideLogs(SaveConfigCallback):
    """Save the run's full config in the logger's folder; a run without a logger (the tiny preset) saves none,
    instead of writing ``config.yaml`` into the working directory."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.logger is not None:
            super().setup(trainer, pl_module, stage)


class SwAVCLI(SwarmCLI):
    """SwarmCLI with the recipe's extras: ``--threads`` and the linear probe's ``--probe.*``."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)  # --progress.*
        parser.add_argument("--threads", type=Optional[int], default=None,
                            help="torch.set_num_threads for this peer (default: torch's choice)")  # fmt: skip
        parser.add_lightning_class_args(LinearProbe, "probe")
        # The LR schedule's length is where training ends: every peer stops at that global step.
        parser.link_arguments("model.max_global_steps", "progress.max_global_steps")

    def before_instantiate_classes(self) -> None:
        threads = self.config.get(self.subcommand, self.config).get("threads")
        if threads:
            torch.set_num_threads(threads)


def main() -> None:
    # Validation is the linear probe after fit; hivemind's averagers run in their own processes.
    warnings.filterwarnings("ignore", message=".*`validation_step` .*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    SwAVCLI(
        SwAV,
        ImageFolderData,
        shorthands={"--tiny": TINY_CONFIG},
        default_config=FULL_CONFIG,
        seed_everything_default=0,  # the same initial weights on every peer
        save_config_callback=SaveConfigBesideLogs,
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    main()
