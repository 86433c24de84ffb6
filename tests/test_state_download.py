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
        load_state_timeout=1.0, matchmaking_time=0.0, client_mode=True,
    )  # fmt: skip
    return optimizer


@pytest.fixture(autouse=True)
def no_gradient_averaging(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(SwarmOptimizer, "use_gradient_averaging", property(lambda self: False))


def test_a_download_that_serves_nothing_is_retried_and_then_raises_instead_of_repeating_every_batch() -> None:
    optimizer = make_optimizer(served=[None] * 10, global_epoch=5)
    with pytest.raises(RuntimeError, match=r"after 3 attempts: no peer served a state .*global step 0, the swarm at 5"):
        optimizer.load_state_from_peers()
    assert optimizer.state_averager.downloads == LOAD_STATE_ATTEMPTS
    assert optimizer.local_epoch == 0


def test_an_empty_first_download_followed_by_a_real_one_succeeds() -> None:
    optimizer = make_optimizer(served=[None, 5], global_epoch=5)
    optimizer.load_state_from_peers()
    assert optimizer.state_averager.downloads == 2
    assert optimizer.local_epoch == 5 and optimizer.tracker.reported == [5]


def test_one_step_behind_with_nothing_served_catches_up_as_hivemind_does() -> None:
    # the swarm may have just stepped: one step behind is not a failure (hivemind bumps the step counter)
    optimizer = make_optimizer(served=[None] * 10, global_epoch=4, local_epoch=3)
    optimizer.load_state_from_peers()
    assert optimizer.local_epoch == 4


def test_a_state_one_step_short_of_the_swarm_is_accepted_and_caught_up() -> None:
    optimizer = make_optimizer(served=[4, None, None, None], global_epoch=5)
    optimizer.load_state_from_peers()
    assert optimizer.local_epoch == 5
