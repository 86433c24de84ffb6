"""``lightning_moshpit.lightning_cli``: shorthand flags, the join command and per-global-step progress (no swarm)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_moshpit.lightning_cli import SwarmProgress, expand_shorthands, this_command


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


def test_swarm_progress_stops_at_the_global_step_and_writes_one_record_per_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a swarm the local step stands in for the global one; ``{peer}`` takes $MOSHPIT_PEER_INDEX."""
    monkeypatch.setenv("MOSHPIT_PEER_INDEX", "3")
    x = torch.randn(64, 4)
    data = DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=8)
    progress = SwarmProgress(max_global_steps=5, history_path=str(tmp_path / "h{peer}.jsonl"))
    trainer = L.Trainer(max_epochs=10, callbacks=[progress], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(_Regression(), data)
    assert trainer.global_step == 5
    rows = [json.loads(line) for line in (tmp_path / "h3.jsonl").read_text().splitlines()]
    assert [row["global_step"] for row in rows] == [0, 1, 2, 3, 4]
    assert all(row["batches"] == 1 and row["peers"] == 1 for row in rows)
    assert rows == progress.history


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_swarm_progress_rejects_a_bad_step_count(bad: object) -> None:
    with pytest.raises(ValueError, match="max_global_steps"):
        SwarmProgress(max_global_steps=bad)  # type: ignore[arg-type]
