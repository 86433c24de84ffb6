"""The benchmarks' profile summaries (``lightning_moshpit.testing.profiling``): py-spy raw output parsed and classified
by phase, and CPU seconds read from /proc. The raw profiles here are written by hand in py-spy's format; the CPU
readings come from this process and a real child process."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from lightning_moshpit.testing import profiling

MAIN = "<module> (bench_peer.py:330);main (bench_peer.py:250);fit (lightning/pytorch/trainer/trainer.py:584)"
STEP = "SwarmOptimizer.step (lightning_moshpit/optimizer.py:440)"
RAW = "\n".join([
    f"{MAIN};{STEP};BenchModule.training_step (bench_peer.py:83) 30",
    f"{MAIN};{STEP};_engine_run_backward (torch/autograd/graph.py:979) 10",
    f"{MAIN};{STEP};Optimizer._update_global_epoch (hivemind/optim/optimizer.py:480);"
    "SwarmOptimizer._average_gradients_and_load_into_optimizer (lightning_moshpit/optimizer.py:360);"
    "Event.wait (threading.py:629) 40",
    f"{MAIN};_DataFetcher.__next__ (lightning/pytorch/loops/fetchers.py:134) 10",
    f"{MAIN};ProfileTraining.on_train_start (bench_peer.py:284) 50",  # the profiler's own start-up: left out
    "Thread._bootstrap (threading.py:1002);Thread.run (threading.py:982);"
    "TrainingStateAverager._do (hivemind/optim/state_averager.py:560) 70",  # another thread: not the main thread's
    "garbage line without a count",
])  # fmt: skip


@pytest.fixture
def raw_profile(tmp_path: Path) -> Path:
    path = tmp_path / "profile.txt"
    path.write_text(RAW + "\n")
    return path


def test_main_thread_samples_are_split_by_their_innermost_phase(raw_profile: Path) -> None:
    phases = profiling.main_thread_phases(raw_profile)
    assert phases == pytest.approx({
        "waiting for the gradient round (matchmaking + all-reduce)": 40 / 90,
        "compute: forward and backward": 40 / 90,  # training_step and backward, both inside optimizer.step
        profiling.LIGHTNING_LOOP: 10 / 90,
    })  # fmt: skip
    assert list(phases)[-1] == profiling.LIGHTNING_LOOP  # largest first


def test_main_thread_leaves_name_the_innermost_frames(raw_profile: Path) -> None:
    leaves = profiling.main_thread_leaves(raw_profile, top=2)
    assert leaves == pytest.approx({"Event.wait (threading.py:629)": 40 / 90,
                                    "BenchModule.training_step (bench_peer.py:83)": 30 / 90})  # fmt: skip


def test_threads_started_by_threading_are_not_the_main_thread() -> None:
    assert profiling.is_main_thread(["<module> (x.py:1)", "f (x.py:2)"])
    assert profiling.is_main_thread(["main (multiprocessing/forkserver.py:300)", "f (x.py:2)"])  # a forked peer
    assert not profiling.is_main_thread(["Thread._bootstrap (threading.py:1002)", "f (x.py:2)"])
    assert not profiling.is_main_thread([])


def test_subprocess_profiles_name_each_stack_by_its_innermost_process(tmp_path: Path) -> None:
    path = tmp_path / "profile.txt"
    path.write_text('process 10:"python peer";process 11:"python peer";DHT.run (hivemind/dht/dht.py:138) 3\n'
                    'process 10:"python peer";worker (averaging.py:156) 1\n'
                    'process 10:"python peer";DecentralizedAverager.step (hivemind/averaging/averager.py:400) 1\n')  # fmt: skip
    stacks = profiling.read_raw_profile(path)
    assert [(s.process, s.frames, s.count, s.child) for s in stacks] == [
        ("process 11", ("DHT.run (hivemind/dht/dht.py:138)",), 3, True),
        ("process 10", ("worker (averaging.py:156)",), 1, False),
        ("process 10", ("DecentralizedAverager.step (hivemind/averaging/averager.py:400)",), 1, False),
    ]
    # the peer's own process calls into its averager too; only child processes get a role from their stacks
    assert profiling.leaf_shares(path) == [
        ("DHT process: DHT.run (hivemind/dht/dht.py:138)", 0.6), ("peer main process: worker (averaging.py:156)", 0.2),
        ("peer main process: DecentralizedAverager.step (hivemind/averaging/averager.py:400)", 0.2),
    ]  # fmt: skip


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads /proc (Linux)")
def test_cpu_seconds_separate_the_main_thread_from_child_processes() -> None:
    import os

    before = profiling.cpu_seconds_by_kind(os.getpid())
    spin = "import time\nend = time.process_time() + 0.5\nwhile time.process_time() < end: pass\nprint('spun', flush=True)\ntime.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", spin], stdout=subprocess.PIPE, text=True)
    try:
        end = time.process_time() + 0.3
        while time.process_time() < end:  # busy in this (main) thread
            pass
        assert child.stdout is not None and child.stdout.readline().strip() == "spun"  # it spun and sleeps, alive
        after = profiling.cpu_seconds_by_kind(os.getpid())
    finally:
        child.kill()
        child.wait()
    assert after["main thread"] - before.get("main thread", 0.0) >= 0.2
    assert after["python children"] - before.get("python children", 0.0) >= 0.4
