"""A peer program for ResIST / IST runs: train on scikit-learn digits in a swarm and write a JSON report.

``python -m lightning_moshpit.testing.resist_peer --out peer0.json --method resist --seconds 30``. Swarm settings come
from the usual environment variables (``MOSHPIT_RUN_ID``, ``MOSHPIT_INITIAL_PEERS``, ...), as for
:mod:`lightning_moshpit.testing.peer`. Methods:

- ``full``: local SGD, full-model averaging every ``--local-steps`` batches (``ResIST``/``IndependentSubnet`` with
  S=1 and the optimizer state kept: the same averager and the same byte counter as the partitioned runs);
- ``resist``: :class:`~lightning_moshpit.ResIST` on a pre-activation ResNet (``--model preact``) or a timm ResNet
  (``--model timm``);
- ``ist``: :class:`~lightning_moshpit.IndependentSubnet` on an MLP (``--model mlp``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_moshpit import IndependentSubnet, MoshpitStrategy, ResIST
from lightning_moshpit.callbacks.subnets import SubnetTraining
from lightning_moshpit.testing.launch import write_atomically
from lightning_moshpit.testing.peer import make_digits
from lightning_moshpit.testing.resnets import PreActResNet


def build_net(model: str, mlp_hidden: int = 512) -> nn.Module:
    """The network a peer trains on 8x8 digits (every peer seeds its init identically)."""
    if model == "preact":
        return PreActResNet(depths=(1, 1, 8, 1), widths=(16, 32, 64, 64), in_channels=1, num_classes=10)
    if model == "timm":
        import timm  # only this model needs timm

        return timm.create_model("resnet26", num_classes=10, in_chans=1, pretrained=False)
    if model == "mlp":
        return nn.Sequential(nn.Linear(64, mlp_hidden), nn.ReLU(), nn.Linear(mlp_hidden, mlp_hidden), nn.ReLU(),
                             nn.Linear(mlp_hidden, 10))  # fmt: skip
    raise ValueError(f"`--model` must be preact, timm or mlp, got {model!r}")


class DigitsClassifier(L.LightningModule):
    """Cross-entropy on digits with SGD + momentum; images for ResNets, flat vectors for MLPs."""

    def __init__(self, net: nn.Module, images: bool, lr: float) -> None:
        super().__init__()
        self.net, self.images, self.lr = net, images, lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.view(-1, 1, 8, 8) if self.images else x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, labels = batch
        return nn.functional.cross_entropy(self(inputs), labels)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class Budget(L.Callback):
    """Stop after ``seconds`` of training (from the first batch) and count batches and time."""

    def __init__(self, seconds: Optional[float]) -> None:
        self.seconds, self.started, self.batches, self.ended = seconds, 0.0, 0, 0.0

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if not self.started:
            self.started = time.monotonic()

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.batches += 1
        self.ended = time.monotonic()
        if self.seconds is not None and self.ended - self.started >= self.seconds:
            trainer.should_stop = True


def accuracy(module: DigitsClassifier, data: TensorDataset) -> float:
    inputs, labels = data.tensors
    module.eval()
    with torch.no_grad():
        return float((module(inputs).argmax(dim=1) == labels).float().mean())


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--address-file", type=Path, default=None)
    parser.add_argument("--method", choices=["full", "resist", "ist"], default="resist")
    parser.add_argument("--model", choices=["preact", "timm", "mlp"], default=None, help="default: by method")
    parser.add_argument("--subnets", type=int, default=None, help="S (default: swarm size)")
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--seconds", type=float, default=None, help="training budget from the first batch")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--min-peers", type=int, default=1)
    parser.add_argument("--matchmaking-time", type=float, default=1.0)
    parser.add_argument("--averaging-timeout", type=float, default=10.0)
    parser.add_argument("--data-seed", type=int, default=0, help="this peer's data order")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    model_name = args.model or ("mlp" if args.method == "ist" else "preact")
    L.seed_everything(0, verbose=False)  # identical initial parameters on every peer
    module = DigitsClassifier(build_net(model_name), images=model_name != "mlp", lr=args.lr)
    train_set, test_set = make_digits()
    data = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=True,
                      generator=torch.Generator().manual_seed(args.data_seed))  # fmt: skip
    full = args.method == "full"
    subnets = 1 if full else args.subnets
    callback: SubnetTraining
    if model_name == "mlp":
        callback = IndependentSubnet(num_subnets=subnets, local_steps=args.local_steps, reset_optimizer=not full)
    else:
        callback = ResIST(num_subnets=subnets, local_steps=args.local_steps, reset_optimizer=not full)
    budget = Budget(args.seconds)
    strategy = MoshpitStrategy(
        local_updates=True,
        target_batch_size=10**9,  # global steps do not matter here: the callback's rounds average the parameters
        min_peers=args.min_peers,
        matchmaking_time=args.matchmaking_time,
        averaging_timeout=args.averaging_timeout,
        host_maddrs=os.environ.get("MOSHPIT_HOST_MADDRS", "/ip4/127.0.0.1/tcp/0"),
    )
    if args.address_file is not None:
        write_atomically(args.address_file, ",".join(strategy.peer_addresses))
    trainer = L.Trainer(
        strategy=strategy, accelerator="cpu", devices=1, max_steps=args.max_steps, max_epochs=-1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[budget, callback],
    )  # fmt: skip
    trainer.fit(module, data)
    rounds = [vars(r) for r in callback.rounds]
    train_seconds = max(budget.ended - budget.started, 1e-9)
    report = {
        "method": args.method,
        "model": model_name,
        "num_subnets": callback.num_subnets,
        "batches": budget.batches,
        "train_seconds": train_seconds,
        "steps_per_second": budget.batches / train_seconds,
        "rounds": rounds,
        "parameters": sum(p.numel() for p in module.net.parameters()),
        "test_accuracy": accuracy(module, test_set),
        "final_tensors": {
            name: tensor.detach().float().flatten().tolist()
            for name, tensor in list(module.net.named_parameters()) + list(module.net.named_buffers())
            if tensor.is_floating_point()
        },
    }
    args.out.write_text(json.dumps(report))


if __name__ == "__main__":
    main()
