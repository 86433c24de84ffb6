"""Train a small MLP on scikit-learn's digits together with whoever joins the swarm.

This is the smallest complete ``lightning_moshpit`` program. Start a swarm that waits for a second peer::

    python examples/digits.py --min-peers 2

It prints the command that joins it from another machine or terminal (``MOSHPIT_RUN_ID=... MOSHPIT_INITIAL_PEERS=...
python examples/digits.py ...``). Every peer runs the *same* script; only the environment tells a peer whether it
starts a swarm or joins one:

- ``MOSHPIT_INITIAL_PEERS``: multiaddrs of any running peer. Unset: start a new swarm.
- ``MOSHPIT_RUN_ID``: the swarm's name. Peers only train together when it matches.
- ``MOSHPIT_TARGET_BATCH_SIZE``: samples the whole swarm processes per global optimizer step (default here 256).
- ``MOSHPIT_HOST_MADDRS``: where to listen (default: every interface, a free port, as ``--host`` says).

Two step counters matter in a swarm:

- the *local* step (``trainer.global_step``, Lightning's name): batches this peer has processed;
- the *global* step (``trainer.strategy.global_step``): optimizer steps the whole swarm has taken together. One
  happens each time the swarm has processed ``target_batch_size`` samples, however many peers contributed.

With 3 peers, a batch of 32 and a target of 256, each global step takes about 256 / (3 * 32) ~ 2.7 local steps
per peer. ``examples/local_swarm.py`` starts several copies of this script on one machine (``make demo``).

The dataset is bundled with scikit-learn (no download). Every peer uses the same fixed train/held-out split and
the same model initialisation, but shuffles its batches differently, as independent volunteers would.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections import deque
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

import lightning_moshpit  # noqa: F401  (importing registers the "moshpit" strategy names)
from lightning_moshpit import MoshpitStrategy
from lightning_moshpit.swarm import ENV_HOST_MADDRS, ENV_TARGET_BATCH_SIZE

NUM_CLASSES = 10
NUM_FEATURES = 64  # 8 x 8 grey-level images
DEFAULT_TARGET_BATCH_SIZE = 256
DEFAULT_HOST = "/ip4/0.0.0.0/tcp/0"


# ---------------------------------------------------------------------------------------------------- data
def load_digits_split(heldout_fraction: float = 0.2, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's 1,797 digit images as (train, held-out) tensor datasets.

    The split uses a fixed seed, so every peer holds out the *same* images and the accuracies they print compare.
    Pixels (0..16) are scaled to 0..1.
    """
    images, labels = load_digits(return_X_y=True)
    inputs = torch.tensor(images, dtype=torch.float32) / 16.0
    targets = torch.tensor(labels, dtype=torch.long)
    order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(seed))
    num_heldout = int(len(targets) * heldout_fraction)
    heldout, train = order[:num_heldout], order[num_heldout:]
    return TensorDataset(inputs[train], targets[train]), TensorDataset(inputs[heldout], targets[heldout])


# ---------------------------------------------------------------------------------------------------- model
class DigitsClassifier(L.LightningModule):
    """A two-layer MLP. Nothing in it knows about the swarm: any LightningModule trains with ``"moshpit"``.

    The learning rate belongs to the *global* batch (``target_batch_size``), because the swarm averages the
    gradients of all its peers' samples before each optimizer step.
    """

    def __init__(self, hidden: int = 128, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(NUM_FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, NUM_CLASSES))
        self.val_accuracy = MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro")

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.net(inputs)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        inputs, labels = batch
        loss = nn.functional.cross_entropy(self(inputs), labels)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        inputs, labels = batch
        self.val_accuracy(self(inputs).argmax(dim=1), labels)
        self.log("val_acc", self.val_accuracy, on_epoch=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


# ---------------------------------------------------------------------------------------------------- reporting
class SwarmProgressPrinter(L.Callback):
    """Prints one plain line every ``every`` local steps: mean recent loss, peers seen and the swarm's global step.

    Plain lines (instead of a progress bar) survive being piped through ``local_swarm.py`` or a log file.
    """

    def __init__(self, every: int) -> None:
        self.every = every
        self.recent_losses: deque[float] = deque(maxlen=every)
        self.started: Optional[float] = None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.started is None:  # the first batch comes after the start barrier: the clock shows training time
            self.started = time.monotonic()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.recent_losses.append(float(outputs["loss"]))
        local_step = trainer.global_step  # Lightning's counter: this peer's optimizer (= local) steps
        if local_step % self.every == 0:
            print(self.format_line(trainer, local_step), flush=True)

    def format_line(self, trainer: L.Trainer, local_step: int) -> str:
        strategy = trainer.strategy
        mean_loss = sum(self.recent_losses) / max(1, len(self.recent_losses))
        # Also logged as trainer.callback_metrics["moshpit/num_peers"] and ["moshpit/global_step"].
        peers = getattr(strategy, "num_peers", 1)
        global_step = getattr(strategy, "global_step", local_step)
        elapsed = time.monotonic() - (self.started or time.monotonic())
        return (
            f"step {local_step:4d} | loss {mean_loss:.3f} | peers {peers} | global step {global_step} | {elapsed:.0f} s"
        )


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` so that a reader polling for ``path`` never sees a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def announce_swarm(strategy: MoshpitStrategy, address_file: Optional[Path]) -> None:
    """Share this peer's addresses: in ``address_file`` if asked, and as a join command if it started the swarm.

    Reading ``strategy.peer_addresses`` starts the DHT (and its libp2p daemon) right away, before ``fit``.
    """
    addresses = strategy.peer_addresses
    if address_file is not None:
        write_atomically(address_file, ",".join(addresses))
    if strategy.initial_peers:
        print(f"Joined swarm run_id={strategy.run_id} through {len(strategy.initial_peers)} address(es)", flush=True)
    else:
        print(f"Started a new swarm (run_id={strategy.run_id}); its join line follows when training starts.", flush=True)
        strategy.join_command = f"python {this_command()}"  # the strategy's join line: this exact command


def this_command() -> str:
    """How this script was started, minus ``--address-file`` (only the first peer writes one), for the join hint."""
    args, skip_next = [], False
    for arg in sys.argv[1:]:
        if skip_next or arg.startswith("--address-file="):
            skip_next = False
            continue
        if arg == "--address-file":
            skip_next = True
            continue
        args.append(arg)
    return " ".join([os.path.relpath(sys.argv[0]), *args])


def quiet_known_warnings() -> None:
    """Hide two harmless Lightning warnings that would repeat once per peer in ``local_swarm.py``'s output."""
    # We validate only after fit, on purpose: a peer that pauses to validate slows the whole swarm's global step.
    warnings.filterwarnings("ignore", message=".*`validation_step` but have no `val_dataloader`.*")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")


# ---------------------------------------------------------------------------------------------------- main
class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the module docstring's layout and show every option's default."""


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument(
        "--max-steps", type=int, default=300,
        help="at most this many local steps (batches); ignored while --max-global-steps is set",
    )  # fmt: skip
    parser.add_argument(
        "--max-global-steps", type=int, default=25,
        help="every peer stops when the swarm reaches this global step, with the same model (0: only --max-steps)",
    )  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=32, help="samples per local batch")
    parser.add_argument(
        "--matchmaking-time", type=float, default=1.0,
        help="seconds to gather an averaging group: 1 s on one machine or a LAN, 5-15 s over the internet",
    )  # fmt: skip
    parser.add_argument(
        "--averaging-timeout", type=float, default=5.0,
        help="give up on an averaging round after this many seconds (must exceed --matchmaking-time)",
    )  # fmt: skip
    parser.add_argument("--min-peers", type=int, default=1, help="wait until this many peers are visible, then start")
    parser.add_argument(
        "--host", default=os.environ.get(ENV_HOST_MADDRS, DEFAULT_HOST),
        help=f"multiaddr(s) to listen on; the default comes from ${ENV_HOST_MADDRS}, else {DEFAULT_HOST}",
    )  # fmt: skip
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate, for the global batch")
    parser.add_argument("--log-every", type=int, default=20, help="print a progress line every this many local steps")
    parser.add_argument("--seed", type=int, default=0, help="model initialisation seed: keep it equal on all peers")
    parser.add_argument("--address-file", type=Path, default=None, help="write this peer's multiaddrs here")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> float:
    """Train, print progress, and return the held-out accuracy."""
    args = parse_args(argv)
    quiet_known_warnings()
    torch.set_num_threads(1)  # several peers share a few cores; one thread each avoids oversubscription
    train, heldout = load_digits_split()
    L.seed_everything(args.seed, verbose=False)  # same initial weights on every peer
    model = DigitsClassifier(lr=args.lr)
    # Each peer shuffles differently (os.getpid() is unique per process), so peers contribute different batches.
    shuffle = torch.Generator().manual_seed(os.getpid())
    train_loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, drop_last=True, generator=shuffle)
    heldout_loader = DataLoader(heldout, batch_size=256)

    # Trainer(strategy="moshpit") is the zero-configuration form (everything from the environment). Building the
    # strategy object lets the command-line flags set matchmaking and the start barrier as well.
    strategy = MoshpitStrategy(
        target_batch_size=None if ENV_TARGET_BATCH_SIZE in os.environ else DEFAULT_TARGET_BATCH_SIZE,
        host_maddrs=args.host,
        matchmaking_time=args.matchmaking_time,
        averaging_timeout=args.averaging_timeout,
        min_peers=args.min_peers,
        max_global_steps=args.max_global_steps or None,  # every peer stops at this global step with the same model
    )  # run_id and initial_peers come from MOSHPIT_RUN_ID and MOSHPIT_INITIAL_PEERS
    announce_swarm(strategy, args.address_file)

    trainer = L.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=1,
        max_steps=args.max_steps,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[SwarmProgressPrinter(args.log_every)],
    )
    trainer.fit(model, train_loader)  # no validation during fit: peers keep pace with each other
    samples = trainer.global_step * args.batch_size  # drop_last=True: every batch is full
    print(
        f"finished: {trainer.global_step} local steps ({samples} samples), swarm at global step {strategy.global_step}",
        flush=True,
    )

    results = trainer.validate(model, heldout_loader, verbose=False)
    accuracy = float(results[0]["val_acc"])
    print(f"held-out accuracy {accuracy:.3f} ({len(heldout)} images)", flush=True)
    return accuracy


if __name__ == "__main__":
    main()
