"""``SwarmOptimizer.load_state_from_peers`` with stand-in averagers (pure logic, no swarm).

hivemind's ``TrainingStateAverager.load_state_from_peers`` returns ``None`` whether it loaded a state or found no peer
to serve one, so the optimizer judges a download by the global step it leaves. The live paths (late joiners, paused
peers) are tested with real peers in ``tests/test_swarm.py`` and ``tests/scenarios/test_pause.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Optional

import pytest

from lightning_moshpit import optimizer as optimizer_module
from lightning_moshpit.optimizer import LOAD_STATE_ATTEMPTS, SwarmOptimizer


class StandInStateAverager:
    """Serves the global steps in ``served`` one download at a time; ``None`` stands for "no peer served anything"."""

    def __init__(self, served: list[Optional[int]], local_epoch: int = 0) -> None:
        self.served, self.local_epoch, self.downloads = list(served), local_epoch, 0
        self.state_sharing_priority = 0

    def load_state_from_peers(self, timeout: float) -> None:
        self.downloads += 1
        epoch = self.served.pop(0) if self.served else None
        if epoch is not None and epoch >= self.local_epoch:  # hivemind refuses a state behind its own
            self.local_epoch = epoch

    def step(self, **kwargs: object) -> None:
        pass


class StandInTracker:
    def __init__(self, global_epoch: int) -> None:
        self.global_epoch = global_epoch
        self.metadata_expiration = 20.0  # a progress record's lifetime: the budget is max(30 s, twice this)
        self.reported: list[int] = []

    @contextlib.contextmanager
    def pause_updates(self) -> Iterator[None]:
        yield

    def report_local_progress(self, local_epoch: int, samples_accumulated: int) -> None:
        self.reported.append(local_epoch)


def make_optimizer(served: list[Optional[int]], global_epoch: int, local_epoch: int = 0) -> SwarmOptimizer:
    optimizer = object.__new__(SwarmOptimizer)  # skip __init__: it starts averagers on a real DHT
    optimizer.__dict__.update(
        state_averager=StandInStateAverager(served, local_epoch), grad_averager=None,
        tracker=StandInTracker(global_epoch), scheduled_grads=None, _joined=True, resyncs=0, run_id="unit",
        load_state_timeout=1.0, matchmaking_time=0.0, averaging_timeout=1.0, client_mode=True,
        _fruitless_downloads=0, _fruitless_since=None,
    )  # fmt: skip
    return optimizer


@pytest.fixture(autouse=True)
def no_gradient_averaging(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(SwarmOptimizer, "use_gradient_averaging", property(lambda self: False))


def test_downloads_that_serve_nothing_raise_once_they_outlast_the_budget_instead_of_repeating_every_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(optimizer_module.time, "monotonic", lambda: clock[0])
    optimizer = make_optimizer(served=[None] * 100, global_epoch=5)
    assert optimizer.fruitless_download_budget == 40.0
    # hivemind's step() calls this at every batch while the peer is behind: within the budget it only counts
    for _ in range(10):
        optimizer.load_state_from_peers()
        clock[0] += 3.0
    assert optimizer.state_averager.downloads == 10 and optimizer.local_epoch == 0
    clock[0] += 15.0  # 45 s since the first fruitless download
    with pytest.raises(RuntimeError, match=r"11 downloads in 45 s served nothing newer than this peer's global step 0, "
                                           r"while the swarm's progress records claim step 5"):  # fmt: skip
        optimizer.load_state_from_peers()


def test_a_download_that_serves_the_state_resets_the_count(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(optimizer_module.time, "monotonic", lambda: clock[0])
    optimizer = make_optimizer(served=[None, None, 5, None, None], global_epoch=5)
    for _ in range(3):
        optimizer.load_state_from_peers()
        clock[0] += 30.0
    assert optimizer.local_epoch == 5 and optimizer._fruitless_downloads == 0
    optimizer.tracker.global_epoch = 9
    optimizer.load_state_from_peers()  # fruitless again, but counted from scratch: no error
    assert optimizer._fruitless_downloads == 1


def test_a_download_that_raises_is_retried_and_then_reported_with_its_cause() -> None:
    optimizer = make_optimizer(served=[], global_epoch=5)

    def broken(timeout: float) -> None:
        optimizer.state_averager.downloads += 1
        raise ConnectionError("holder went away")

    optimizer.state_averager.load_state_from_peers = broken  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="after 3 attempts: ConnectionError: holder went away") as raised:
        optimizer.load_state_from_peers()
    assert isinstance(raised.value.__cause__, ConnectionError)
    assert optimizer.state_averager.downloads == LOAD_STATE_ATTEMPTS


def test_one_step_behind_with_nothing_served_catches_up_as_hivemind_does() -> None:
    # the swarm may have just stepped: one step behind is not a failure (hivemind bumps the step counter)
    optimizer = make_optimizer(served=[None] * 10, global_epoch=4, local_epoch=3)
    optimizer.load_state_from_peers()
    assert optimizer.local_epoch == 4


def test_a_state_one_step_short_of_the_swarm_is_accepted_and_caught_up() -> None:
    optimizer = make_optimizer(served=[4, None, None, None], global_epoch=5)
    optimizer.load_state_from_peers()
    assert optimizer.local_epoch == 5 and optimizer._fruitless_downloads == 0


def test_a_state_one_step_short_is_downloaded_again_until_a_holder_serves_the_swarms_step() -> None:
    """The first holder was still applying its update (step 4); a moment later one serves step 5: no relabelling."""
    optimizer = make_optimizer(served=[4, 4, 5], global_epoch=5)
    optimizer.load_state_from_peers()
    assert optimizer.local_epoch == 5 and optimizer.state_averager.downloads == 3
