"""A ``LightningCLI`` for swarm training scripts: preset flags, the exact join command, progress per global step.

The recipes under ``recipes/`` are ordinary LightningCLI programs (``python train.py fit --config ...``), so every
hyperparameter is settable from the command line or YAML. Three things a swarm script needs on top of that live here:

- **Shorthand flags.** ``SwarmCLI(..., shorthands={"--tiny": Path("configs/tiny.yaml")})`` makes ``fit --tiny``
  mean ``fit --config configs/tiny.yaml``; a shorthand can also stand for a list of arguments. Arguments written
  on the command line still override what a shorthand sets.
- **The join command.** A peer that starts a new swarm logs the command a newcomer runs. SwarmCLI hands the strategy
  *this* script with *these* arguments (``MoshpitStrategy.join_command``), so that one line can be pasted as it is,
  instead of the placeholder ``python <your script>``.
- **Global steps.** Lightning's ``max_steps`` and ``trainer.global_step`` count *local* batches, which differ from
  peer to peer. :class:`SwarmProgress` (always added, as ``--progress.*``) prints one line per *swarm* step, can
  stop every peer at the same global step and writes the history as JSON lines for plots and tests.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import lightning as L
from lightning.pytorch.cli import LightningCLI

from lightning_moshpit.strategy import MoshpitStrategy

#: The LightningCLI subcommands after which a shorthand's arguments are inserted.
SUBCOMMANDS = ("fit", "validate", "test", "predict")
#: What a shorthand flag stands for: a YAML config file, or a list of arguments.
Shorthand = Union[str, Path, Sequence[str]]


def expand_shorthands(argv: Sequence[str], shorthands: Mapping[str, Shorthand]) -> list[str]:
    """Replace each shorthand flag in ``argv`` by what it stands for, placed right after the subcommand.

    A shorthand stands for a YAML file (``--config <file>``) or for a list of arguments. Placing them first means
    every argument written on the command line overrides them, wherever the flag was written::

        >>> expand_shorthands(["fit", "--trainer.max_steps", "5", "--tiny"], {"--tiny": Path("tiny.yaml")})
        ['fit', '--config', 'tiny.yaml', '--trainer.max_steps', '5']
    """
    inserted: list[str] = []
    for arg in argv:
        if arg in shorthands:
            meaning = shorthands[arg]
            inserted += ["--config", str(meaning)] if isinstance(meaning, (str, Path)) else list(meaning)
    rest = [arg for arg in argv if arg not in shorthands]
    position = next((i + 1 for i, arg in enumerate(rest) if arg in SUBCOMMANDS), 0)
    return rest[:position] + inserted + rest[position:]


def this_command(argv: Optional[Sequence[str]] = None) -> str:
    """The shell command that started this process, as a newcomer types it (``python path/train.py fit ...``)."""
    argv = list(sys.argv if argv is None else argv)
    return shlex.join(["python", *argv])


class SwarmProgress(L.Callback):
    """One line (and one JSON record) per global step of the swarm, and an optional stop at a global step.

    A *global* step is one optimizer step of the whole swarm (``MoshpitStrategy.global_step``); every peer enters
    the next one in the same averaging round, so ``max_global_steps`` stops all peers together however many local
    batches each contributed. Without a ``MoshpitStrategy`` the local step stands in for the global one.

    Args:
        max_global_steps: Stop training once the swarm reaches this global step; 0 means no limit (then only the
            Trainer's ``max_steps`` / ``max_epochs`` / ``max_time`` stop it).
        history_path: If set, append one JSON object per global step to this file: ``global_step``, ``loss`` (mean
            training loss of this peer's batches during that step), ``batches``, ``peers`` and ``seconds`` since
            training began, and ``group_size``: the most peers a gradient-averaging round of this peer averaged with
            (itself included) among the rounds that ended since the previous record; 0 when none succeeded (always
            0 without a swarm). A test can assert from it that peers really averaged, not only saw each other.
            A peer that fell more than one step behind (paused, or starved of CPU) loads the swarm's state and jumps
            ahead: each step it skipped still gets a record, with ``batches`` 0, ``loss`` NaN, ``group_size`` 0 and
            ``caught_up`` true (``caught_up`` is false on every other record), so the file always holds one record
            per global step from the first to the last. ``{peer}`` in the path becomes ``$MOSHPIT_PEER_INDEX`` (set
            by ``lightning-moshpit local``), so local peers write separate files.
        print_every: Print every this many global steps (0: never).
    """

    def __init__(self, max_global_steps: int = 0, history_path: Optional[str] = None, print_every: int = 1) -> None:
        for name, value in (("max_global_steps", max_global_steps), ("print_every", print_every)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"`{name}` must be an integer >= 0, got {value!r}")
        self.max_global_steps = max_global_steps
        self.print_every = print_every
        self.history_path = (
            Path(history_path.replace("{peer}", os.environ.get("MOSHPIT_PEER_INDEX", "0"))) if history_path else None
        )
        self.history: list[dict[str, Any]] = []
        self._losses: list[float] = []
        self._step: Optional[int] = None
        self._started = 0.0
        self._rounds_seen = 0

    @staticmethod
    def global_step(trainer: L.Trainer) -> int:
        """The swarm's global step under ``MoshpitStrategy``, else Lightning's (local) step."""
        strategy = trainer.strategy
        return strategy.global_step if isinstance(strategy, MoshpitStrategy) else trainer.global_step

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        strategy = trainer.strategy
        if self.max_global_steps and isinstance(strategy, MoshpitStrategy):
            # the strategy stops every peer at that step with the same model (and applies a delayed update first)
            if strategy.max_global_steps not in (None, self.max_global_steps):
                raise ValueError(
                    f"SwarmProgress(max_global_steps={self.max_global_steps}) disagrees with "
                    f"MoshpitStrategy(max_global_steps={strategy.max_global_steps}); set one of them"
                )
            strategy.max_global_steps = self.max_global_steps

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.monotonic()  # after the start barrier: the clock shows training time only
        self._step = self.global_step(trainer)
        self._losses = []
        self._rounds_seen = len(getattr(trainer.strategy, "averaging_rounds", []))
        if self.history_path is not None:
            self.history_path.parent.mkdir(parents=True, exist_ok=True)
            self.history_path.write_text("")

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if loss is not None:
            self._losses.append(float(loss))
        step = self.global_step(trainer)
        if self._step is not None and step != self._step:
            self._record(trainer, self._step)
            # A jump of more than one step: this peer loaded the swarm's state after falling behind. Without these
            # records the steps in between vanished from the history, and a peer that jumped onto max_global_steps
            # ended its history one or more steps short of the others (issue 16: ALBERT's last record was step 8 of 10).
            for skipped in range(self._step + 1, step):
                self._record(trainer, skipped, caught_up=True)
            self._step = step
        if self.max_global_steps and step >= self.max_global_steps and not isinstance(trainer.strategy, MoshpitStrategy):
            trainer.should_stop = True  # under MoshpitStrategy, its max_global_steps (set in setup) stops the peer

    def _record(self, trainer: L.Trainer, step: int, caught_up: bool = False) -> None:
        """Close global step ``step``: the mean loss of this peer's batches while the swarm was at that step.

        ``caught_up``: this peer skipped the step (it loaded the swarm's state), so it has no batches and no round.
        """
        mean = sum(self._losses) / len(self._losses) if self._losses else float("nan")
        peers = getattr(trainer.strategy, "num_peers", 1)
        rounds = getattr(trainer.strategy, "averaging_rounds", [])
        group = max((r.group_size for r in rounds[self._rounds_seen :]), default=0)
        self._rounds_seen = len(rounds)
        row = {"global_step": step, "loss": mean, "batches": len(self._losses), "peers": peers, "group_size": group,
               "caught_up": caught_up, "seconds": round(time.monotonic() - self._started, 3)}  # fmt: skip
        self.history.append(row)
        self._losses = []
        if self.history_path is not None:
            with self.history_path.open("a") as file:
                file.write(json.dumps(row) + "\n")
        if self.print_every and (step % self.print_every == 0 or step + 1 == self.max_global_steps):
            what = "skipped: caught up by loading the swarm's state" if caught_up else f"loss {mean:.4f}"
            print(f"[swarm] global step {step:4d} | {what} | {row['batches']} "
                  f"batches | peers {peers} | {row['seconds']:.0f} s", flush=True)  # fmt: skip


class SwarmCLI(LightningCLI):
    """``LightningCLI`` plus shorthand flags, the exact join command and :class:`SwarmProgress` as ``--progress.*``.

    Use it like LightningCLI::

        SwarmCLI(MyModule, MyDataModule, shorthands={"--tiny": Path(__file__).parent / "configs/tiny.yaml"},
                 default_config=Path(__file__).parent / "configs/full.yaml")

    Args:
        shorthands: Flags that stand for ``--config <file>`` or for a list of arguments (see
            :func:`expand_shorthands`). The join command keeps the short form.
        default_config: A YAML file read before any other configuration (for example the full-size preset, so that
            the plain command runs it, strategy included). ``--config`` files and arguments override it.
        args: The arguments (default ``sys.argv[1:]``), before the shorthands are expanded.
        **kwargs: Passed to ``LightningCLI``.
    """

    def __init__(
        self,
        *cli_args: Any,
        shorthands: Optional[Mapping[str, Shorthand]] = None,
        default_config: Optional[Union[str, Path]] = None,
        args: Optional[Sequence[str]] = None,
        **kwargs: Any,
    ) -> None:
        original = list(sys.argv[1:] if args is None else args)
        self.command = this_command([sys.argv[0], *original])
        if default_config is not None:
            parser_kwargs = dict(kwargs.pop("parser_kwargs", None) or {})
            for subcommand in SUBCOMMANDS:
                sub = dict(parser_kwargs.get(subcommand, {}))
                sub.setdefault("default_config_files", [str(default_config)])
                parser_kwargs[subcommand] = sub
            kwargs["parser_kwargs"] = parser_kwargs
        expanded = expand_shorthands(original, shorthands or {})
        if args is None:  # LightningCLI warns when given both sys.argv and args: hand it the expansion as sys.argv
            sys.argv[1:] = expanded
            super().__init__(*cli_args, **kwargs)
        else:
            super().__init__(*cli_args, args=expanded, **kwargs)

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_lightning_class_args(SwarmProgress, "progress")

    def before_fit(self) -> None:
        """Hand the strategy this very command for its join line (unless ``join_command`` was configured)."""
        strategy = self.trainer.strategy
        if isinstance(strategy, MoshpitStrategy) and strategy.join_command is None:
            strategy.join_command = self.command
