"""``lightning_moshpit.lightning_cli``: shorthand flags, the join command and per-global-step progress (no swarm)."""

from __future__ import annotations

import json
import logging
import math
import shlex
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_moshpit import MoshpitStrategy, swarm
from lightning_moshpit.lightning_cli import SwarmCLI, SwarmProgress, expand_shorthands, this_command


def test_a_config_shorthand_goes_right_after_the_subcommand_so_arguments_override_it() -> None:
    argv = ["fit", "--model.lr", "0.1", "--tiny"]
    assert expand_shorthands(argv, {"--tiny": Path("c/tiny.yaml")}) == [
        "fit", "--config", "c/tiny.yaml", "--model.lr", "0.1"
    ]  # fmt: skip


def test_argument_shorthands_expand_in_the_order_written_and_other_flags_stay() -> None:
    shorthands = {"--tiny": "tiny.yaml", "--editable": ["--trainer.callbacks+=Edit", "--trainer.callbacks.lr=1"]}
    assert expand_shorthands(["--editable", "fit", "--tiny", "--x", "1"], shorthands) == [
        "fit", "--trainer.callbacks+=Edit", "--trainer.callbacks.lr=1", "--config", "tiny.yaml", "--x", "1"
    ]  # fmt: skip
    assert expand_shorthands(["fit", "--x", "1"], shorthands) == ["fit", "--x", "1"]


def test_the_join_command_is_the_command_as_typed_and_quoted_for_a_shell() -> None:
    assert this_command(["recipes/a/train.py", "fit", "--tiny", "--data.text_files", "[a b.txt]"]) == (
        "python recipes/a/train.py fit --tiny --data.text_files '[a b.txt]'"
    )


class _Regression(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _fit_without_swarm(progress: SwarmProgress) -> L.Trainer:
    """Fit the small regression model on 8 batches per epoch, for up to 10 epochs, with ``progress`` attached."""
    x = torch.randn(64, 4)
    data = DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=8)
    trainer = L.Trainer(max_epochs=10, callbacks=[progress], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(_Regression(), data)
    return trainer


def test_swarm_progress_stops_at_the_global_step_and_writes_one_record_per_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a swarm the local step stands in for the global one; ``{peer}`` takes $MOSHPIT_PEER_INDEX."""
    monkeypatch.setenv("MOSHPIT_PEER_INDEX", "3")
    progress = SwarmProgress(max_global_steps=5, history_path=str(tmp_path / "h{peer}.jsonl"))
    trainer = _fit_without_swarm(progress)
    assert trainer.global_step == 5
    rows = [json.loads(line) for line in (tmp_path / "h3.jsonl").read_text().splitlines()]
    assert [row["global_step"] for row in rows] == [0, 1, 2, 3, 4]
    assert all(row["batches"] == 1 and row["peers"] == 1 and row["group_size"] == 0 for row in rows)
    assert rows == progress.history


class _JumpingProgress(SwarmProgress):
    """A peer that fell behind after global step 1 and loaded the swarm's state at step 4 (local step 2)."""

    @staticmethod
    def global_step(trainer: L.Trainer) -> int:
        return trainer.global_step if trainer.global_step < 2 else trainer.global_step + 2


def test_swarm_progress_writes_a_caught_up_record_for_every_step_a_peer_skipped(tmp_path: Path) -> None:
    """Issue 16: a peer that jumped from step 8 onto max_global_steps=10 ended its history at 8, with no record of 9."""
    progress = _JumpingProgress(max_global_steps=6, history_path=str(tmp_path / "h.jsonl"))
    _fit_without_swarm(progress)
    rows = [json.loads(line) for line in (tmp_path / "h.jsonl").read_text().splitlines()]
    assert [row["global_step"] for row in rows] == [0, 1, 2, 3, 4, 5]
    assert [row["caught_up"] for row in rows] == [False, False, True, True, False, False]
    assert [row["batches"] for row in rows] == [1, 1, 0, 0, 1, 1]
    assert all(math.isnan(row["loss"]) for row in rows[2:4]) and all(math.isfinite(row["loss"]) for row in rows[4:])


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_swarm_progress_rejects_a_bad_step_count(bad: object) -> None:
    with pytest.raises(ValueError, match="max_global_steps"):
        SwarmProgress(max_global_steps=bad)  # type: ignore[arg-type]


def test_swarm_cli_gives_the_strategy_this_command_for_its_one_join_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """The strategy logs the only join line, with the script and arguments that started this peer, not the
    placeholder ``python <your script>`` (a user pasted that one, and the shell refused its ``<``)."""
    monkeypatch.setattr(sys, "argv", ["recipes/x/train.py"])
    args = ["--trainer.strategy=lightning_moshpit.MoshpitStrategy", "--trainer.strategy.init_args.run_id=r1",
            "--trainer.logger=false"]  # fmt: skip
    cli = SwarmCLI(_Regression, args=args, run=False)
    cli.before_fit()
    assert isinstance(cli.trainer.strategy, MoshpitStrategy)
    assert cli.trainer.strategy.join_command == cli.command == "python recipes/x/train.py " + " ".join(args)
    hint = swarm.join_command_hint(["/ip4/127.0.0.1/tcp/1/p2p/X"], "r1", cli.trainer.strategy.join_command)
    assert hint == f"To join this swarm: MOSHPIT_RUN_ID=r1 MOSHPIT_INITIAL_PEERS=/ip4/127.0.0.1/tcp/1/p2p/X {cli.command}"

    configured = SwarmCLI(_Regression, args=[*args, "--trainer.strategy.init_args.join_command=python run.py"], run=False)
    configured.before_fit()
    assert configured.trainer.strategy.join_command == "python run.py"  # a configured command is kept


def test_the_join_line_names_the_target_batch_size_only_when_it_came_from_the_environment() -> None:
    line = swarm.join_command(["/ip4/127.0.0.1/tcp/1/p2p/X"], "r1", "python t.py", target_batch_size=64)
    assert line == "MOSHPIT_RUN_ID=r1 MOSHPIT_INITIAL_PEERS=/ip4/127.0.0.1/tcp/1/p2p/X MOSHPIT_TARGET_BATCH_SIZE=64 python t.py"
    assert swarm.join_command_hint([], "r1").endswith("python <your script>")
    with pytest.raises(ValueError, match="`join_command` must be a non-empty shell command or None, got ' '"):
        MoshpitStrategy(join_command=" ")


class _RegressionWithData(_Regression):
    def train_dataloader(self) -> DataLoader:
        x = torch.randn(64, 4)
        return DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=8)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_peer_that_starts_a_swarm_logs_one_join_line_with_its_own_command(
    run_id: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """End to end: ``fit`` through SwarmCLI with a real (one-peer) swarm."""
    monkeypatch.setattr(sys, "argv", ["train.py"])
    args = ["fit", "--trainer.strategy=lightning_moshpit.MoshpitStrategy", f"--trainer.strategy.init_args.run_id={run_id}",
            "--trainer.strategy.init_args.host_maddrs=[/ip4/127.0.0.1/tcp/0]",
            "--trainer.strategy.init_args.target_batch_size=8", "--trainer.strategy.init_args.matchmaking_time=0.5",
            "--trainer.strategy.init_args.averaging_timeout=5", "--progress.max_global_steps=1",
            "--trainer.logger=false", "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false"]  # fmt: skip
    with caplog.at_level(logging.INFO):
        SwarmCLI(_RegressionWithData, args=args, save_config_callback=None)
    joins = [record.getMessage() for record in caplog.records if "To join this swarm" in record.getMessage()]
    assert len(joins) == 1, caplog.text[-3000:]
    assert joins[0].endswith(f" python train.py {shlex.join(args)}"), joins  # quoted for a shell: '[...]'
    assert f"MOSHPIT_RUN_ID={run_id} MOSHPIT_INITIAL_PEERS=/ip4/127.0.0.1/tcp/" in joins[0]
