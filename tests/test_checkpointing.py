"""The monitor checkpointer's choice of what to save, with a stand-in averager (pure logic, no swarm).

The live checkpoint path (a real monitor downloading from real trainers) is tested in tests/test_live_swarm.py.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from lightning_moshpit.checkpointing import SwarmCheckpointer


class ServedStates:
    """Stands in for the client-mode TrainingStateAverager: each download "serves" the next global step of a list."""

    def __init__(self, served: list[int]) -> None:
        self.served, self.local_epoch = list(served), 0
        self.optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)

    def load_state_from_peers(self, timeout: float) -> None:
        self.local_epoch = max(self.local_epoch, self.served.pop(0))  # hivemind refuses a state behind its own


def make_checkpointer(tmp_path: Path, served: list[int], every: int = 5) -> SwarmCheckpointer:
    checkpointer = object.__new__(SwarmCheckpointer)  # skip __init__: it starts a real averager on a DHT
    checkpointer.module, checkpointer.directory, checkpointer.every, checkpointer.timeout = (
        torch.nn.Linear(2, 1), tmp_path, every, 1.0)  # fmt: skip
    checkpointer.averager, checkpointer.saved, checkpointer._saved_step, checkpointer._thread = (
        ServedStates(served), [], 0, None)  # fmt: skip
    return checkpointer


def snapshot(step: int) -> SimpleNamespace:
    return SimpleNamespace(global_step=step, peers=["a trainer"])


def saved_steps(checkpointer: SwarmCheckpointer) -> list[int]:
    return [int(path.stem.split("_")[1]) for path in checkpointer.saved]


def run(checkpointer: SwarmCheckpointer, swarm_steps: list[int]) -> None:
    for step in swarm_steps:
        checkpointer(snapshot(step))
        if checkpointer._thread is not None:
            checkpointer._thread.join(5)


def test_a_state_served_one_step_early_is_not_saved_and_the_next_snapshot_downloads_again(tmp_path: Path) -> None:
    # The swarm reports step 5 and then 10, but the serving trainer has not applied them yet at the first try
    checkpointer = make_checkpointer(tmp_path, served=[4, 5, 9, 10])
    run(checkpointer, [3, 5, 5, 6, 10, 10])
    assert saved_steps(checkpointer) == [5, 10]
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert saved["moshpit_global_step"] == 10
    assert saved["optimizer_states"][0]["state"]["local_epoch"] == 10


def test_a_state_served_late_is_named_by_its_step_and_closes_its_window(tmp_path: Path) -> None:
    # Step 5's download returns step 7 (the swarm moved on): saved as step_000007, no second checkpoint before 10
    checkpointer = make_checkpointer(tmp_path, served=[7, 11])
    run(checkpointer, [5, 6, 7, 8, 9, 11, 12])
    assert saved_steps(checkpointer) == [7, 11]
    assert sorted(path.name for path in tmp_path.glob("step_*.ckpt")) == ["step_000007.ckpt", "step_000011.ckpt"]


def test_nothing_is_downloaded_before_the_first_multiple_or_without_peers(tmp_path: Path) -> None:
    checkpointer = make_checkpointer(tmp_path, served=[])
    run(checkpointer, [0, 1, 4])
    checkpointer(SimpleNamespace(global_step=5, peers=[]))
    assert checkpointer._thread is None and checkpointer.saved == []
