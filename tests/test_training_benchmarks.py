"""The pure parts of benchmarks/throughput.py and benchmarks/time_to_accuracy.py: argument checks and the metrics they
compute from the processes' step clocks. No process is started; the benchmarks themselves are not run here."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import throughput  # noqa: E402
import time_to_accuracy  # noqa: E402
import training_runs  # noqa: E402

from lightning_moshpit.testing import bench_peer  # noqa: E402


def report(rank: int, batch_ends: list[float], batch_size: int = 10, evaluations: list | None = None) -> dict:
    return {"rank": rank, "batch_size": batch_size, "batch_ends": batch_ends, "started": batch_ends[0] - 1.0,
            "evaluations": evaluations or [], "rounds": []}  # fmt: skip


def test_rates_are_measured_over_the_span_all_processes_share() -> None:
    fast = report(0, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])  # one batch per second
    slow = report(1, [1.5, 3.5, 5.5, 7.5])  # one batch per two seconds, started later, finished later
    assert training_runs.common_window([fast, slow], warmup_batches=1) == (3.5, 6.0)
    rates = training_runs.samples_per_second([fast, slow], warmup_batches=1)
    assert rates == pytest.approx([10 * 3 / 2.5, 10 * 1 / 2.5])  # batches ending in (3.5, 6.0]: 4, 5, 6 and 5.5


def test_processes_that_never_overlap_are_an_error_not_a_rate() -> None:
    with pytest.raises(ValueError, match="never ran together"):
        training_runs.common_window([report(0, [1.0, 2.0, 3.0]), report(1, [4.0, 5.0, 6.0])], warmup_batches=1)
    with pytest.raises(ValueError, match="raise the number of steps"):
        training_runs.common_window([report(0, [1.0, 2.0])], warmup_batches=1)


def test_time_to_accuracy_takes_the_first_process_there_less_its_evaluation_time() -> None:
    peer0 = report(0, [11.0, 12.0], evaluations=[
        {"time": 14.0, "eval_seconds": 0.0, "step": 1, "accuracy": 0.5},
        {"time": 16.0, "eval_seconds": 0.5, "step": 2, "accuracy": 0.96},
    ])  # fmt: skip
    peer1 = report(1, [10.5, 11.5], evaluations=[{"time": 15.8, "eval_seconds": 0.1, "step": 2, "accuracy": 0.95}])
    # the run starts at peer 1's start (9.5); peer 0 got there at 16.0 - 0.5, peer 1 at 15.8 - 0.1
    assert training_runs.time_to_accuracy([peer0, peer1], 0.95) == pytest.approx(15.5 - 9.5)
    assert training_runs.steps_to_accuracy([peer0, peer1], 0.95) == 2
    assert training_runs.time_to_accuracy([peer0, peer1], 0.99) is None


def test_throughput_warms_up_for_one_global_step_and_measures_enough_batches() -> None:
    assert throughput.batches_per_process(ratio=64, peers=4, global_steps=4, min_batches=12) == (16, 16 + 64)
    assert throughput.batches_per_process(ratio=4, peers=4, global_steps=4, min_batches=12) == (2, 2 + 12)


def test_bad_arguments_are_named() -> None:
    with pytest.raises(SystemExit):
        throughput.parse_args(["--ratios", "0"])
    with pytest.raises(SystemExit):
        time_to_accuracy.parse_args(["--target-batch-size", "100"])  # not a multiple of 16 x 4
    with pytest.raises(SystemExit):
        bench_peer.parse_args(["--out", "x.json", "--mode", "moshpit"])  # no --target-batch-size
    with pytest.raises(SystemExit):
        bench_peer.parse_args(["--out", "x.json", "--mode", "solo", "--target-accuracy", "0.9"])  # synthetic task


def test_ddp_time_to_accuracy_is_compared_with_ddp_under_the_same_throttling() -> None:
    rows = [
        {"mode": "ddp", "throttled": False, "time_to_accuracy": 10.0},
        {"mode": "moshpit", "throttled": False, "time_to_accuracy": 12.0},
        {"mode": "ddp", "throttled": True, "time_to_accuracy": 30.0},
        {"mode": "moshpit", "throttled": True, "time_to_accuracy": 15.0},
        {"mode": "moshpit_dpu", "throttled": True, "time_to_accuracy": None},
    ]
    time_to_accuracy.add_ratios(rows)
    assert [row["ratio_to_ddp"] for row in rows] == [1.0, 1.2, 1.0, 0.5, None]


def test_round_seconds_are_the_median_of_successful_rounds_over_all_processes() -> None:
    first, second = report(0, [1.0, 2.0]), report(1, [1.0, 2.0])
    first["rounds"] = [{"group_size": 4, "seconds": 0.5}, {"group_size": 0, "seconds": 9.0}]  # the failed one is left out
    second["rounds"] = [{"group_size": 4, "seconds": 1.5}, {"group_size": 2, "seconds": 3.0}]
    assert training_runs.median_round_seconds([first, second]) == 1.5
    assert training_runs.median_round_seconds([first]) == 0.5
    assert training_runs.median_round_seconds([report(0, [1.0])]) is None  # DDP, solo: no rounds


class FakeProcess:
    """Exits with ``code`` at its ``exits_after``-th poll (``None``: never)."""

    def __init__(self, code: int, exits_after: int | None) -> None:
        self.code, self.exits_after, self.polls = code, exits_after, 0

    def poll(self) -> int | None:
        self.polls += 1
        return self.code if self.exits_after is not None and self.polls >= self.exits_after else None


def test_a_failed_process_does_not_leave_the_launcher_waiting_for_the_others() -> None:
    crashed, hung = FakeProcess(1, exits_after=1), FakeProcess(0, exits_after=None)  # a DDP rank waiting in gloo
    codes = training_runs.wait_or_fail_fast([crashed, hung], timeout=60.0, grace=0.05, poll_every=0.01)
    assert codes == [1, None]
    finished = [FakeProcess(0, exits_after=3), FakeProcess(0, exits_after=1)]
    assert training_runs.wait_or_fail_fast(finished, timeout=60.0, poll_every=0.0) == [0, 0]
    with pytest.raises(TimeoutError, match="1 process"):
        training_runs.wait_or_fail_fast([FakeProcess(0, None)], timeout=0.05, poll_every=0.01)
