"""A peer program: train a small model with ``strategy="moshpit"`` and write what happened to a JSON file.

Run one per process, e.g. ``python -m lightning_moshpit.testing.peer --out peer0.json --max-steps 50``. Swarm settings
come from the usual environment variables (``MOSHPIT_RUN_ID``, ``MOSHPIT_INITIAL_PEERS``, ...), so the same command
starts a swarm or joins one. The data is generated from a fixed seed (a random "teacher" network labels Gaussian
inputs), so every peer samples from the same task without downloading anything.
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

import lightning_moshpit
from lightning_moshpit import MoshpitStrategy
from lightning_moshpit.clipping import DEFAULT_DROP_FACTOR
from lightning_moshpit.testing.attacks import ATTACKS, GRADIENT_ATTACKS, flip_labels, install_gradient_attack
from lightning_moshpit.testing.launch import write_atomically


def make_task(num_samples: int, num_features: int = 16, num_classes: int = 4, seed: int = 0) -> TensorDataset:
    """Gaussian inputs labelled by a fixed random teacher network: learnable, offline, deterministic."""
    generator = torch.Generator().manual_seed(seed)
    teacher = torch.randn(num_features, num_classes, generator=generator)
    inputs = torch.randn(num_samples, num_features, generator=generator)
    labels = (inputs @ teacher + 0.1 * torch.randn(num_samples, num_classes, generator=generator)).argmax(dim=1)
    return TensorDataset(inputs, labels)


def make_test_task(num_samples: int = 1024, num_features: int = 16, num_classes: int = 4, seed: int = 0) -> TensorDataset:
    """Held-out samples of :func:`make_task`'s task: the same teacher, fresh inputs."""
    generator = torch.Generator().manual_seed(seed)
    teacher = torch.randn(num_features, num_classes, generator=generator)
    inputs = torch.randn(num_samples, num_features, generator=torch.Generator().manual_seed(seed + 10_000))
    return TensorDataset(inputs, (inputs @ teacher).argmax(dim=1))


def make_digits(heldout: int = 360, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's 1,797 8x8 digits (bundled, no download) as fixed (train, held-out) splits, pixels in [0, 1]."""
    from sklearn.datasets import load_digits  # optional dependency: only this task needs it

    digits = load_digits()
    inputs = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(seed))
    test, train = order[:heldout], order[heldout:]
    return TensorDataset(inputs[train], labels[train]), TensorDataset(inputs[test], labels[test])


#: (input features, classes) of each task
TASKS = {"teacher": (16, 4), "digits": (64, 10)}


class TinyClassifier(L.LightningModule):
    """An MLP (optionally with BatchNorm) with an optional sleep per step that stands in for heavy compute."""

    def __init__(self, hidden: int = 32, batch_norm: bool = False, lr: float = 0.1, compute_seconds: float = 0.0,
                 scheduler: bool = False, nan_batches: frozenset[int] = frozenset(), in_features: int = 16,
                 num_classes: int = 4) -> None:  # fmt: skip
        super().__init__()
        self.nan_batches = nan_batches  # local batch indices whose loss (hence every gradient) is made NaN
        layers: list[nn.Module] = [nn.Linear(in_features, hidden)]
        if batch_norm:
            layers.append(nn.BatchNorm1d(hidden))
        layers += [nn.ReLU(), nn.Linear(hidden, num_classes)]
        self.net = nn.Sequential(*layers)
        self.lr, self.compute_seconds, self.use_scheduler = lr, compute_seconds, scheduler

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, labels = batch
        if self.compute_seconds:
            time.sleep(self.compute_seconds)
        loss = nn.functional.cross_entropy(self.net(inputs), labels)
        self.log("train_loss", loss, prog_bar=True)
        if self.trainer.global_step in self.nan_batches:
            return loss * float("nan")  # a broken batch: every gradient becomes NaN
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        if not self.use_scheduler:
            return optimizer
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class SwarmRecorder(L.Callback):
    """Records, per global step, this peer's flattened parameters and the loss, for the test to compare.

    With ``progress_file``, the current global step is also written there whenever it changes, so a test can start
    a late joiner once the swarm has made some progress.
    """

    def __init__(self, progress_file: Optional[Path] = None) -> None:
        self.progress_file = progress_file
        self.snapshots: dict[int, list[float]] = {}
        self.losses: list[float] = []
        self.step_times: list[float] = []
        self.first_step_global: Optional[int] = None
        self.first_step_params: Optional[list[float]] = None
        self.first_step_buffers: Optional[list[float]] = None
        self.lrs: dict[int, float] = {}
        self.global_steps: list[int] = []  # the swarm's global step after each local step
        self.num_peers: list[int] = []  # swarm size this peer saw after each local step
        self.optimizer_snapshots: dict[int, list[float]] = {}  # optimizer state (e.g. momentum) per global step
        self.first_step_optimizer_state: Optional[list[float]] = None
        self.dropped_batches = 0
        self.resyncs = 0

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.first_step_global is None:
            self.first_step_global = getattr(trainer.strategy, "global_step", trainer.global_step)
            self.first_step_params = _flat(module)
            self.first_step_buffers = _flat_buffers(module)
            self.first_step_optimizer_state = _flat_optimizer_state(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        self.step_times.append(time.time())
        self.losses.append(float(outputs["loss"]))
        epoch = getattr(trainer.strategy, "global_step", trainer.global_step)
        if epoch not in self.snapshots and self.progress_file is not None:
            tmp = self.progress_file.with_suffix(".tmp")
            tmp.write_text(str(epoch))
            tmp.rename(self.progress_file)
        self.snapshots.setdefault(epoch, _flat(module))
        if epoch not in self.optimizer_snapshots:
            self.optimizer_snapshots[epoch] = _flat_optimizer_state(trainer)
        self.lrs.setdefault(epoch, trainer.optimizers[0].param_groups[0]["lr"])
        self.global_steps.append(epoch)
        self.num_peers.append(getattr(trainer.strategy, "num_peers", 1))
        swarm_optimizer = getattr(trainer.strategy, "swarm_optimizer", None)
        if swarm_optimizer is not None:
            self.dropped_batches, self.resyncs = swarm_optimizer.dropped_batches, swarm_optimizer.resyncs


class ByzantineAndTiming(L.Callback):
    """Once the swarm optimizer exists: make this peer send an attack's gradients (if any), and time every
    gradient-averaging round (seconds spent in the optimizer's average-and-load step, waiting for the group included).
    """

    def __init__(self, attack: str, scale: float, seed: int) -> None:
        self.attack, self.scale, self.seed = attack, scale, seed
        self.round_seconds: list[float] = []

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        swarm_optimizer = getattr(trainer.strategy, "swarm_optimizer", None)
        if swarm_optimizer is None or swarm_optimizer.grad_averager is None:
            return
        if self.attack in GRADIENT_ATTACKS:
            install_gradient_attack(swarm_optimizer.grad_averager, self.attack, self.scale, seed=self.seed)
        average = swarm_optimizer._average_gradients_and_load_into_optimizer

        def timed(control: Any) -> None:
            started = time.perf_counter()
            average(control)
            if control is not None:
                self.round_seconds.append(time.perf_counter() - started)

        swarm_optimizer._average_gradients_and_load_into_optimizer = timed


class StopAtGlobalStep(L.Callback):
    """Stop training once the swarm's global step reaches ``step``: every peer then ends with the same parameters,
    whatever number of local steps its share of the CPU allowed (a fixed local-step budget made fast peers leave
    early, and the rest finish in smaller groups)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        if getattr(trainer.strategy, "global_step", 0) >= self.step:
            trainer.should_stop = True


class StopWhenFileExists(L.Callback):
    """Stop training (cleanly: report written, swarm left) once ``path`` exists. A scenario creates the file when the
    peers it watches are done, instead of guessing a local-step budget that outlasts them."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        if self.path.exists():
            trainer.should_stop = True


def evaluate(model: nn.Module, data: TensorDataset) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``model.net`` on ``data``; NaN parameters give NaN loss and low accuracy."""
    inputs, labels = data.tensors
    with torch.no_grad():
        logits = model.net(inputs)
        return float((logits.argmax(dim=1) == labels).float().mean()), float(nn.functional.cross_entropy(logits, labels))


def _flat(module: nn.Module) -> list[float]:
    """Parameters only: BatchNorm running statistics move on every forward pass, so peers differ within a step."""
    return torch.cat([p.detach().float().flatten() for p in module.parameters()]).cpu().tolist()


def _flat_optimizer_state(trainer: L.Trainer) -> list[float]:
    """Every tensor in the optimizer's per-parameter state (SGD's momentum buffers), flattened in parameter order."""
    optimizer = trainer.optimizers[0]
    optimizer = getattr(optimizer, "opt", optimizer)  # hivemind.Optimizer keeps the real one in .opt
    tensors = [
        value.detach().float().flatten()
        for group in optimizer.param_groups
        for parameter in group["params"]
        for value in optimizer.state.get(parameter, {}).values()
        if isinstance(value, torch.Tensor) and value.dim() > 0
    ]
    return torch.cat(tensors).cpu().tolist() if tensors else []


def _flat_buffers(module: nn.Module) -> list[float]:
    buffers = [b.detach().float().flatten() for b in module.buffers() if b.is_floating_point()]
    return torch.cat(buffers).cpu().tolist() if buffers else []


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON report")
    parser.add_argument("--max-steps", type=int, default=50, help="local optimizer steps (Trainer max_steps)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--samples", type=int, default=4096, help="size of the generated dataset")
    parser.add_argument("--seed", type=int, default=0, help="model init seed (data seed is fixed)")
    parser.add_argument("--accumulate", type=int, default=1, help="Trainer accumulate_grad_batches")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--batch-norm", action="store_true")
    parser.add_argument("--scheduler", action="store_true")
    parser.add_argument("--compute-seconds", type=float, default=0.0, help="sleep per batch to emulate compute")
    parser.add_argument("--solo", action="store_true", help="train alone without any strategy (baseline)")
    parser.add_argument("--min-peers", type=int, default=1)
    parser.add_argument("--matchmaking-time", type=float, default=1.0)
    parser.add_argument("--averaging-timeout", type=float, default=10.0)
    parser.add_argument("--group-size", type=int, default=16)
    parser.add_argument("--dpu", action="store_true", help="delayed parameter updates")
    parser.add_argument("--ckpt-dir", type=Path, default=None, help="save a checkpoint every global step here")
    parser.add_argument("--resume", type=Path, default=None, help="ckpt_path to resume from")
    parser.add_argument("--progress-file", type=Path, default=None, help="keep the current global step here")
    parser.add_argument("--verbose", action="store_true", help="log hivemind's progress messages")
    parser.add_argument("--address-file", type=Path, default=None, help="write this peer's multiaddrs here")
    parser.add_argument("--lr", type=float, default=0.1, help="SGD learning rate")
    parser.add_argument("--hidden", type=int, default=32, help="hidden width (another value: another architecture)")
    parser.add_argument("--nan-batches", default="", help="comma-separated local steps whose gradients become NaN")
    parser.add_argument("--metadata-expiration", type=float, default=None, help="override tracker_opts")
    parser.add_argument("--task", choices=sorted(TASKS), default="teacher", help="training data (both offline)")
    parser.add_argument("--aggregation", choices=["mean", "centered_clip"], default="mean")
    parser.add_argument("--clip-tau", type=float, default=None, help="CenteredClip radius (default: adaptive)")
    parser.add_argument("--clip-iters", type=int, default=10)
    parser.add_argument("--clip-drop", type=float, default=DEFAULT_DROP_FACTOR,
                        help="reject members beyond this many clipping radii; 0 disables (clip only)")  # fmt: skip
    parser.add_argument("--attack", choices=ATTACKS, default="none", help="make this peer Byzantine")
    parser.add_argument("--attack-scale", type=float, default=1000.0, help="sign flip factor / attack norm ratio")
    parser.add_argument("--max-global-steps", type=int, default=None, help="also stop at this swarm global step")
    parser.add_argument("--end-at-global-step", type=int, default=None,
                        help="MoshpitStrategy(max_global_steps=...): stop there with the final parameter round")
    parser.add_argument("--local-updates", action="store_true", help="MoshpitStrategy(local_updates=True)")
    parser.add_argument("--stop-file", type=Path, default=None, help="also stop (cleanly) once this file exists")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    # a process started in the background inherits SIGINT ignored; a peer must react to Ctrl-C like one in a terminal
    signal.signal(signal.SIGINT, signal.default_int_handler)
    L.seed_everything(args.seed, verbose=False)
    nan_batches = frozenset(int(step) for step in args.nan_batches.split(",") if step)
    in_features, num_classes = TASKS[args.task]
    model = TinyClassifier(hidden=args.hidden, lr=args.lr, batch_norm=args.batch_norm, compute_seconds=args.compute_seconds,
                           scheduler=args.scheduler, nan_batches=nan_batches, in_features=in_features,
                           num_classes=num_classes)  # fmt: skip
    train_set, test_set = make_digits() if args.task == "digits" else (make_task(args.samples), make_test_task())
    if args.attack == "label_flip":
        train_set = TensorDataset(train_set.tensors[0], flip_labels(train_set.tensors[1], num_classes))
    data = DataLoader(train_set, batch_size=args.batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(args.seed))  # fmt: skip
    recorder = SwarmRecorder(args.progress_file)
    byzantine = ByzantineAndTiming(args.attack, args.attack_scale, args.seed)
    callbacks: list[L.Callback] = [recorder, byzantine]
    if args.max_global_steps is not None:
        callbacks.append(StopAtGlobalStep(args.max_global_steps))
    if args.stop_file is not None:
        callbacks.append(StopWhenFileExists(args.stop_file))
    if args.ckpt_dir is not None:
        callbacks.append(L.pytorch.callbacks.ModelCheckpoint(dirpath=args.ckpt_dir, save_last=True,
                                                             every_n_train_steps=1, save_top_k=0))  # fmt: skip
    strategy: Any = "auto"
    if not args.solo:
        extra: dict[str, Any] = {}
        if args.metadata_expiration is not None:
            extra["tracker_opts"] = {"metadata_expiration": args.metadata_expiration}
        strategy = MoshpitStrategy(
            min_peers=args.min_peers,
            matchmaking_time=args.matchmaking_time,
            averaging_timeout=args.averaging_timeout,
            group_size=args.group_size,
            delay_parameter_updates=args.dpu,
            local_updates=args.local_updates,
            max_global_steps=args.end_at_global_step,
            verbose=args.verbose,
            aggregation=args.aggregation,
            clip_tau=args.clip_tau,
            clip_iters=args.clip_iters,
            clip_drop=args.clip_drop or None,
            host_maddrs=os.environ.get("MOSHPIT_HOST_MADDRS", "/ip4/127.0.0.1/tcp/0"),
            **extra,
        )
        if args.address_file is not None:
            write_atomically(args.address_file, ",".join(strategy.peer_addresses))
    trainer = L.Trainer(
        strategy=strategy, accelerator="cpu", devices=1, max_steps=args.max_steps, max_epochs=-1,
        accumulate_grad_batches=args.accumulate, precision=args.precision, logger=False,
        enable_checkpointing=args.ckpt_dir is not None, enable_progress_bar=False, enable_model_summary=False,
        callbacks=callbacks,
    )  # fmt: skip
    started = time.time()
    trainer.fit(model, data, ckpt_path=args.resume)
    test_accuracy, test_loss = evaluate(model, test_set)
    report = {
        "test_accuracy": test_accuracy,
        "test_loss": test_loss,
        "attack": args.attack,
        "aggregation": args.aggregation,
        "round_seconds": byzantine.round_seconds,
        "wall_seconds": time.time() - started,
        "local_steps": trainer.global_step,
        "global_step": trainer.strategy.global_step if not args.solo else None,
        "rounds": [vars(r) for r in trainer.strategy.averaging_rounds] if not args.solo else [],
        "snapshots": recorder.snapshots,
        "first_step_global": recorder.first_step_global,
        "first_step_params": recorder.first_step_params,
        "first_step_buffers": recorder.first_step_buffers,
        "final_params": _flat(model),
        "final_buffers": _flat_buffers(model),
        "final_round_group_size": getattr(trainer.strategy, "final_round_group_size", None),
        "samples": trainer.strategy.samples_contributed if not args.solo else None,
        "losses": recorder.losses,
        "global_steps": recorder.global_steps,
        "num_peers": recorder.num_peers,
        "optimizer_snapshots": recorder.optimizer_snapshots,
        "first_step_optimizer_state": recorder.first_step_optimizer_state,
        "dropped_batches": recorder.dropped_batches,
        "resyncs": recorder.resyncs,
        "lrs": recorder.lrs,
        "step_times": recorder.step_times,
        "version": lightning_moshpit.__version__,
    }
    args.out.write_text(json.dumps(report))


if __name__ == "__main__":
    main()
