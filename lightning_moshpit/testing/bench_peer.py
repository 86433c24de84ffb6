"""A benchmark peer: train one model alone, as one DDP (gloo) rank, or as one moshpit peer, and record step times.

``benchmarks/throughput.py`` and ``benchmarks/time_to_accuracy.py`` start one of these per process through
:class:`~lightning_moshpit.testing.launch.LocalSwarm`, so every mode runs the same Lightning loop, model, batch and
optimizer; only the strategy differs:

- ``solo``: plain Lightning, no strategy (``accumulate_grad_batches`` makes its optimizer step as big as the others');
- ``ddp``: Lightning's ``DDPStrategy`` with the gloo backend. The launcher sets ``LOCAL_RANK``, ``WORLD_SIZE``,
  ``MASTER_ADDR`` and ``MASTER_PORT``, so Lightning joins that process group instead of spawning its own processes;
- ``moshpit``, ``moshpit_dpu``, ``moshpit_local``: :class:`~lightning_moshpit.MoshpitStrategy` in the default mode, with
  delayed parameter updates, and with local updates. Swarm settings come from the usual ``MOSHPIT_*`` variables.

Tasks (both offline): ``synthetic`` is a 3-conv CNN on random 3x32x32 images (throughput only: the labels are noise),
``digits`` a small CNN on scikit-learn's 8x8 digits with a held-out test set, evaluated after every optimizer step
when ``--target-accuracy`` is given (training stops once it is reached).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_moshpit import MoshpitStrategy
from lightning_moshpit.testing import profiling
from lightning_moshpit.testing.launch import write_atomically

log = logging.getLogger(__name__)
MODES = ("solo", "ddp", "moshpit", "moshpit_dpu", "moshpit_local")
TASKS = ("synthetic", "digits")


def synthetic_cnn(width: int) -> nn.Sequential:
    """Three 3x3 conv blocks (width, 2 width, 4 width channels) and a linear head on 3x32x32 inputs."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(4 * width * 16, 10),
    )  # fmt: skip


def digits_cnn(width: int) -> nn.Sequential:
    """Two 3x3 conv layers and a 2x2 pool on 1x8x8 digits, then a linear head (about 10k parameters at width 16)."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * width * 16, 10),
    )  # fmt: skip


def make_data(task: str, seed: int) -> tuple[TensorDataset, Optional[TensorDataset]]:
    """(train, test) sets; ``synthetic`` has no test set. ``digits`` keeps 360 of the 1,797 images for testing."""
    if task == "synthetic":
        generator = torch.Generator().manual_seed(seed)
        return TensorDataset(torch.randn(2048, 3, 32, 32, generator=generator),
                             torch.randint(0, 10, (2048,), generator=generator)), None  # fmt: skip
    from lightning_moshpit.testing.peer import make_digits

    train, test = make_digits(seed=0)  # the same split in every process
    return (TensorDataset(train.tensors[0].view(-1, 1, 8, 8), train.tensors[1]),
            TensorDataset(test.tensors[0].view(-1, 1, 8, 8), test.tensors[1]))  # fmt: skip


class BenchModule(L.LightningModule):
    """A classifier whose training step can also sleep: ``compute_seconds`` stands in for accelerator work (it uses no
    CPU) and ``throttle_seconds`` makes this process a straggler."""

    def __init__(self, net: nn.Module, lr: float, compute_seconds: float = 0.0, throttle_seconds: float = 0.0) -> None:
        super().__init__()
        self.net, self.lr = net, lr
        self.sleep_seconds = compute_seconds + throttle_seconds

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, labels = batch
        if self.sleep_seconds:
            time.sleep(self.sleep_seconds)
        return nn.functional.cross_entropy(self.net(inputs), labels)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class StepClock(L.Callback):
    """Wall time (``time.time()``, comparable across processes) at the start of training and after every batch; with a
    test set, the test accuracy after every optimizer step, and a stop once ``target_accuracy`` is reached.

    With ``stop_file``, the process that reaches the target first creates that file and the others stop when they see
    it (swarm peers whose last rounds differed need not reach the target at the same step; DDP ranks always do, and
    must stop together, so they get no stop file). Evaluation time is recorded (``eval_seconds``) so the launcher can leave it out of time-to-accuracy.
    """

    def __init__(self, test_set: Optional[TensorDataset], target_accuracy: Optional[float],
                 stop_file: Optional[Path] = None) -> None:  # fmt: skip
        self.test_set, self.target_accuracy, self.stop_file = test_set, target_accuracy, stop_file
        self.started: Optional[float] = None
        self.batch_ends: list[float] = []
        # per optimizer step: time, evaluation seconds spent before it, the step and the test accuracy
        self.evaluations: list[dict[str, float]] = []
        self.eval_seconds = 0.0
        self.reached_at: Optional[float] = None
        self._last_step = 0

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.started is None:
            self.started = time.time()

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        now = time.time()
        self.batch_ends.append(now)
        if self.stop_file is not None and self.stop_file.exists():  # another process of the run reached the target
            trainer.should_stop = True
        step = optimizer_step(trainer)
        if self.test_set is None or step == self._last_step:
            return
        self._last_step = step
        accuracy = test_accuracy(module, self.test_set)
        self.evaluations.append({"time": now, "eval_seconds": self.eval_seconds, "step": step, "accuracy": accuracy})
        self.eval_seconds += time.time() - now
        if self.target_accuracy is not None and accuracy >= self.target_accuracy and self.reached_at is None:
            self.reached_at = now
            trainer.should_stop = True
            if self.stop_file is not None:
                self.stop_file.touch()


def optimizer_step(trainer: L.Trainer) -> int:
    """Optimizer steps so far: the swarm's global step for moshpit, Lightning's (accumulation-aware) otherwise."""
    return int(getattr(trainer.strategy, "global_step", trainer.global_step))


def test_accuracy(module: L.LightningModule, data: TensorDataset) -> float:
    inputs, labels = data.tensors
    was_training = module.training
    module.eval()
    with torch.no_grad():
        accuracy = float((module.net(inputs).argmax(dim=1) == labels).float().mean())
    module.train(was_training)
    return accuracy


def build_strategy(args: argparse.Namespace) -> Any:
    if args.mode == "solo":
        return "auto"
    if args.mode == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(process_group_backend="gloo")
    return MoshpitStrategy(
        target_batch_size=args.target_batch_size,
        batch_size=args.batch_size,
        min_peers=args.min_peers,
        matchmaking_time=args.matchmaking_time,
        averaging_timeout=args.averaging_timeout,
        delay_parameter_updates=args.mode == "moshpit_dpu",
        local_updates=args.mode == "moshpit_local",
        host_maddrs=os.environ.get("MOSHPIT_HOST_MADDRS", "/ip4/127.0.0.1/tcp/0"),
    )


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON report")
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--task", choices=TASKS, default="synthetic")
    parser.add_argument("--width", type=int, default=32, help="channels of the first conv layer")
    parser.add_argument("--batch-size", type=int, default=32, help="local batch")
    parser.add_argument("--max-steps", type=int, default=100, help="local batches (an upper bound with a target)")
    parser.add_argument("--accumulate", type=int, default=1, help="accumulate_grad_batches (solo and ddp)")
    parser.add_argument("--target-batch-size", type=int, default=None, help="moshpit: samples per global step")
    parser.add_argument("--min-peers", type=int, default=1, help="moshpit start barrier")
    parser.add_argument("--matchmaking-time", type=float, default=2.0)
    parser.add_argument("--averaging-timeout", type=float, default=10.0)
    parser.add_argument("--lr", type=float, default=0.05, help="SGD (momentum 0.9) learning rate")
    parser.add_argument("--compute-seconds", type=float, default=0.0, help="sleep per batch standing in for compute")
    parser.add_argument("--throttle-seconds", type=float, default=0.0, help="extra sleep per batch: a straggler")
    parser.add_argument("--target-accuracy", type=float, default=None, help="digits: stop at this test accuracy")
    parser.add_argument("--stop-file", type=Path, default=None, help="stop when this file exists; create it at target")
    parser.add_argument("--seed", type=int, default=0, help="model init seed; data order seed is seed + rank")
    parser.add_argument("--rank", type=int, default=0, help="this process's index (data order)")
    parser.add_argument("--start-barrier", type=Path, default=None, help="solo: wait for --barrier-count processes")
    parser.add_argument("--barrier-count", type=int, default=1)
    parser.add_argument("--address-file", type=Path, default=None, help="moshpit: write this peer's multiaddrs here")
    parser.add_argument("--profile", type=Path, default=None,
                        help="py-spy this process while it trains (raw stacks to this file, idle threads included) "
                             "and add its CPU seconds by thread and process kind to the report")  # fmt: skip
    args = parser.parse_args(argv)
    if args.target_accuracy is not None and args.task != "digits":
        parser.error(f"--target-accuracy needs --task digits (the only task with a test set), got --task {args.task}")
    if args.mode == "ddp" and args.stop_file is not None:
        parser.error("--stop-file cannot be used with --mode ddp: ranks stopping at different batches would hang")
    if args.mode.startswith("moshpit") and args.target_batch_size is None:
        parser.error(f"--mode {args.mode} needs --target-batch-size")
    return args


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    L.seed_everything(args.seed, verbose=False)  # the same initial model in every process
    net = synthetic_cnn(args.width) if args.task == "synthetic" else digits_cnn(args.width)
    model = BenchModule(net, args.lr, args.compute_seconds, args.throttle_seconds)
    train_set, test_set = make_data(args.task, args.seed)
    loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(args.seed + args.rank))  # fmt: skip
    strategy = build_strategy(args)
    if args.address_file is not None:  # LocalSwarm's first process writes it; non-swarm modes have no address
        addresses = ",".join(strategy.peer_addresses) if isinstance(strategy, MoshpitStrategy) else "none"
        write_atomically(args.address_file, addresses)
    clock = StepClock(test_set, args.target_accuracy, args.stop_file)
    callbacks: list[L.Callback] = [clock, BatchBudget(args.max_steps)]
    if args.start_barrier is not None:
        callbacks.insert(0, StartBarrier(args.start_barrier, args.rank, args.barrier_count))
    profiler = ProfileTraining(args.profile) if args.profile is not None else None
    if profiler is not None:
        callbacks.append(profiler)
    trainer = L.Trainer(
        strategy=strategy, accelerator="cpu", devices=int(os.environ.get("WORLD_SIZE", 1)) if args.mode == "ddp" else 1,
        max_steps=-1, max_epochs=-1,
        accumulate_grad_batches=1 if args.mode.startswith("moshpit") else args.accumulate,
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=callbacks,
    )  # fmt: skip
    trainer.fit(model, loader)
    report = {
        "mode": args.mode,
        "rank": args.rank,
        "batch_size": args.batch_size,
        "started": clock.started,
        "batch_ends": clock.batch_ends,
        "evaluations": clock.evaluations,
        "reached_at": clock.reached_at,
        "eval_seconds": clock.eval_seconds,
        "optimizer_steps": optimizer_step(trainer),
        "rounds": [vars(r) for r in getattr(trainer.strategy, "averaging_rounds", [])],
        "final_accuracy": test_accuracy(model, test_set) if test_set is not None else None,
        "profile": profiler.summary() if profiler is not None else None,
    }
    args.out.write_text(json.dumps(report))


class StartBarrier(L.Callback):
    """Independent (``solo``) processes start training together: each touches ``<directory>/<rank>`` when ready and
    waits until ``count`` such files exist, so their measured spans overlap although start-up times differ."""

    def __init__(self, directory: Path, rank: int, count: int, timeout: float = 300.0) -> None:
        self.directory, self.rank, self.count, self.timeout = directory, rank, count, timeout

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / str(self.rank)).touch()
        deadline = time.monotonic() + self.timeout
        while len(list(self.directory.iterdir())) < self.count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(list(self.directory.iterdir()))} of {self.count} processes reached the "
                                   f"start barrier in {self.directory} within {self.timeout} s")  # fmt: skip
            time.sleep(0.05)


class ProfileTraining(L.Callback):
    """Profile this process from the start of training to its end (after the start barriers). Two py-spy samplers:

    - the main thread's wall time (``idle=True``, written to ``path``), summarised by phase;
    - CPU only, this process *and* its children (hivemind's averager and DHT processes), written beside it with the
      suffix ``.cpu.txt``, summarised by process role and innermost frame;

    plus the CPU seconds of the main thread, other threads, child processes and p2pd over the same span. See
    :mod:`lightning_moshpit.testing.profiling`."""

    def __init__(self, path: Path, rate: int = 50) -> None:
        self.path, self.rate = path, rate
        self.cpu_path = path.with_suffix(".cpu.txt")
        self._samplers: list[Any] = []
        self._cpu_before: dict[str, float] = {}
        self._cpu: dict[str, float] = {}
        self._started = self._seconds = 0.0

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._samplers = [
            profiling.start_py_spy(os.getpid(), self.path, rate=self.rate, idle=True),
            # a lower rate: with --subprocesses py-spy samples every process of the peer, and its CPU is not free
            profiling.start_py_spy(os.getpid(), self.cpu_path, rate=max(1, self.rate // 3), subprocesses=True),
        ]
        time.sleep(1.0)  # let py-spy attach before the first batch
        for sampler in self._samplers:
            if sampler.poll() is not None:  # e.g. ptrace not permitted: the summary will be empty, say why
                log.warning(f"py-spy exited at once (code {sampler.returncode}): {profiling.PY_SPY_HINT}")
        self._cpu_before = profiling.cpu_seconds_by_kind(os.getpid())
        self._started = time.monotonic()

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._seconds = time.monotonic() - self._started
        after = profiling.cpu_seconds_by_kind(os.getpid())
        self._cpu = {kind: after[kind] - self._cpu_before.get(kind, 0.0) for kind in after}
        self._stop()

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException) -> None:
        self._stop()  # a failed run leaves no sampler behind

    def _stop(self) -> None:
        samplers, self._samplers = self._samplers, []
        for sampler in samplers:
            profiling.stop_py_spy(sampler)

    def summary(self) -> dict[str, Any]:
        found, cpu_found = self.path.exists(), self.cpu_path.exists()
        return {"raw": str(self.path), "seconds": self._seconds, "cpu_seconds": self._cpu,
                "main_thread_phases": profiling.main_thread_phases(self.path) if found else {},
                "main_thread_leaves": profiling.main_thread_leaves(self.path) if found else {},
                "cpu_leaves": profiling.leaf_shares(self.cpu_path, top=15) if cpu_found else []}  # fmt: skip


class BatchBudget(L.Callback):
    """Stop after ``batches`` local batches. Lightning's ``max_steps`` counts optimizer steps, which accumulation
    makes ``accumulate`` times rarer; the benchmarks compare modes at the same number of local batches."""

    def __init__(self, batches: int) -> None:
        self.batches, self.seen = batches, 0

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        self.seen += 1
        if self.seen >= self.batches:
            trainer.should_stop = True


if __name__ == "__main__":
    main()
