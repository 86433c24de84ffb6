"""A peer program for Editable Training in a swarm: ``Trainer.fit`` with ``strategy="moshpit"`` and ``EditableTraining``.

Run one per process, e.g. ``python -m lightning_moshpit.testing.editable_peer --out peer0.json --max-steps 60``. It
takes the same swarm environment variables as :mod:`lightning_moshpit.testing.peer` (``MOSHPIT_RUN_ID``,
``MOSHPIT_INITIAL_PEERS``, ``MOSHPIT_TARGET_BATCH_SIZE``, ...) and the same ``--out`` / ``--address-file`` arguments,
so :class:`~lightning_moshpit.testing.launch.LocalSwarm` can start it. The JSON report holds the parameters at every
global step, the final parameters, the averaging rounds and the edit metrics the callback logged.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_moshpit.callbacks import EditableTraining
from lightning_moshpit.strategy import MoshpitStrategy
from lightning_moshpit.testing.launch import write_atomically
from lightning_moshpit.testing.peer import make_task


class EditableClassifier(L.LightningModule):
    """16 → 32 → 32 → 4; ``net.2`` is the editable hidden layer. A sleep per batch stands in for heavy compute."""

    def __init__(self, compute_seconds: float = 0.0, lr: float = 0.1) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
        self.compute_seconds, self.lr = compute_seconds, lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, labels = batch
        if self.compute_seconds:
            time.sleep(self.compute_seconds)
        return nn.functional.cross_entropy(self(inputs), labels)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class ParameterRecorder(L.Callback):
    """This peer's flattened parameters at the first local step of every global step, and the edit metrics."""

    def __init__(self) -> None:
        self.snapshots: dict[int, list[float]] = {}
        self.edit_metrics: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        step = getattr(trainer.strategy, "global_step", trainer.global_step)
        self.snapshots.setdefault(step, _flat(module))
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("edit/")}
        if metrics:
            self.edit_metrics.append(metrics)


def _flat(module: nn.Module) -> list[float]:
    return torch.cat([p.detach().float().flatten() for p in module.parameters()]).cpu().tolist()


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON report")
    parser.add_argument("--address-file", type=Path, default=None, help="write this peer's multiaddrs here")
    parser.add_argument("--max-steps", type=int, default=60, help="local optimizer steps (Trainer max_steps)")
    parser.add_argument("--max-global-steps", type=int, default=None,
                        help="stop at this global step of the swarm instead (MoshpitStrategy max_global_steps)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="model init, data order and edit seed")
    parser.add_argument("--compute-seconds", type=float, default=0.0, help="sleep per batch to emulate compute")
    parser.add_argument("--min-peers", type=int, default=1)
    parser.add_argument("--matchmaking-time", type=float, default=1.0)
    parser.add_argument("--averaging-timeout", type=float, default=10.0)
    parser.add_argument("--editable", default="net.2.*")
    parser.add_argument("--editor", default="gd", choices=["gd", "momentum", "rmsprop"])
    parser.add_argument("--editor-max-steps", type=int, default=5)
    parser.add_argument("--c-loc", type=float, default=0.1)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    L.seed_everything(args.seed, verbose=False)
    model = EditableClassifier(compute_seconds=args.compute_seconds)
    data = DataLoader(make_task(2048), batch_size=args.batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(args.seed))  # fmt: skip
    editable = EditableTraining(editable=args.editable, editor=args.editor, max_steps=args.editor_max_steps,
                                c_loc=args.c_loc, seed=args.seed)  # fmt: skip
    recorder = ParameterRecorder()
    strategy = MoshpitStrategy(
        min_peers=args.min_peers,
        matchmaking_time=args.matchmaking_time,
        averaging_timeout=args.averaging_timeout,
        max_global_steps=args.max_global_steps,
        host_maddrs=os.environ.get("MOSHPIT_HOST_MADDRS", "/ip4/127.0.0.1/tcp/0"),
    )
    if args.address_file is not None:
        write_atomically(args.address_file, ",".join(strategy.peer_addresses))
    trainer = L.Trainer(
        strategy=strategy, accelerator="cpu", devices=1, max_steps=args.max_steps, max_epochs=-1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[editable, recorder],
    )  # fmt: skip
    trainer.fit(model, data)
    report = {
        "local_steps": trainer.global_step,
        "global_step": strategy.global_step,
        "rounds": [vars(r) for r in strategy.averaging_rounds],
        "snapshots": recorder.snapshots,
        "final_params": _flat(model),
        "edit_metrics": recorder.edit_metrics,
        "edits": editable.metrics["steps"].update_count,
        "training_step_restored": "training_step" not in model.__dict__,
    }
    args.out.write_text(json.dumps(report))


if __name__ == "__main__":
    main()
