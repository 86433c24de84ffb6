"""Shared by ``throughput.py`` and ``time_to_accuracy.py``: start N training processes in one mode, and read their
step clocks.

Every process runs :mod:`lightning_moshpit.testing.bench_peer` (one model, one Lightning loop; only the strategy
differs) through :class:`~lightning_moshpit.testing.launch.LocalSwarm`, which kills each process group, p2pd
included, when the run ends or fails. The metrics below are pure functions of the processes' JSON reports, so they are
unit-tested without starting anything.
"""

from __future__ import annotations

import json
import socket
import statistics
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from lightning_moshpit.testing.launch import LocalSwarm

BENCH_PEER = "lightning_moshpit.testing.bench_peer"
SWARM_MODES = ("moshpit", "moshpit_dpu", "moshpit_local")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch(workdir: Path, mode: str, processes: int, common: Sequence[str],
           per_process: Optional[Sequence[Sequence[str]]] = None, timeout: float = 600.0) -> tuple[list[dict], float]:  # fmt: skip
    """Run ``processes`` bench peers in ``mode`` until they all exit; returns their reports and the launch time.

    ``solo`` processes run side by side without talking to each other (the fair baseline on a shared CPU); ``ddp``
    processes form one gloo process group; moshpit processes one swarm with a start barrier on all of them.
    """
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    env: dict[str, str] = {}
    if mode == "ddp":
        env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(processes),
               "NODE_RANK": "0"}  # fmt: skip
    swarm_mode = mode in SWARM_MODES
    launched = time.time()
    with LocalSwarm(workdir, f"bench_{uuid.uuid4().hex[:8]}", env=env) as swarm:
        for rank in range(processes):
            args = ["--mode", mode, "--rank", str(rank), *common, *(per_process[rank] if per_process else ())]
            if swarm_mode:
                args += ["--min-peers", str(processes)]
            elif mode == "solo":  # independent processes: a file barrier lines up their starts
                args += ["--start-barrier", str(workdir / "start_barrier"), "--barrier-count", str(processes)]
            rank_env = {"LOCAL_RANK": str(rank), "RANK": str(rank)} if mode == "ddp" else None
            # only a swarm's later peers join through the first one's address; other modes start independently
            swarm.start_peer(args, bootstrap=rank == 0 or not swarm_mode, env=rank_env, module=BENCH_PEER)
        try:
            codes = wait_or_fail_fast(swarm.processes, timeout)
        except TimeoutError as error:
            raise RuntimeError(f"{mode} x{processes} timed out; logs in {workdir}") from error
        if codes != [0] * processes:  # leaving the block kills whatever still runs
            logs = "\n".join(f"--- process {i}\n{swarm.log(i)[-2500:]}" for i in range(processes))
            raise RuntimeError(f"{mode} x{processes} exited with {codes}:\n{logs}")
    return [json.loads(swarm.report_path(rank).read_text()) for rank in range(processes)], launched


def wait_or_fail_fast(processes: Sequence[Any], timeout: float, grace: float = 30.0,
                      poll_every: float = 0.2) -> list[Optional[int]]:  # fmt: skip
    """Exit codes of ``processes`` once all have exited, or as they stand ``grace`` s after the first one failed.

    A DDP rank that dies leaves the others waiting in gloo forever (seen here: a rank that crashed at start-up hung
    its run until the 30-minute timeout), and a swarm that lost a peer would finish without it, measuring something
    else. Either way the run is void, so do not wait for it. ``None`` marks a process still running.
    """
    deadline = time.monotonic() + timeout
    failed_at: Optional[float] = None
    while True:
        codes = [process.poll() for process in processes]
        if all(code is not None for code in codes):
            return codes
        now = time.monotonic()
        if failed_at is None and any(code not in (None, 0) for code in codes):
            failed_at = now
        if failed_at is not None and now - failed_at >= grace:
            return codes
        if now > deadline:
            raise TimeoutError(f"{sum(code is None for code in codes)} process(es) still running after {timeout} s")
        time.sleep(poll_every)


def common_window(reports: Sequence[dict[str, Any]], warmup_batches: int) -> tuple[float, float]:
    """The time span in which every process was past its first ``warmup_batches`` batches and none had finished.

    Measuring all processes over the same span means each one shared the CPU with all the others for all of it: a
    process that finished early cannot make the rest look faster.
    """
    for report in reports:
        if len(report["batch_ends"]) <= warmup_batches + 1:
            raise ValueError(
                f"process {report['rank']} ran {len(report['batch_ends'])} batches, not more than "
                f"warmup_batches + 1 = {warmup_batches + 1}: raise the number of steps"
            )
    start = max(report["batch_ends"][warmup_batches] for report in reports)
    end = min(report["batch_ends"][-1] for report in reports)
    if end <= start:
        raise ValueError(f"the processes never ran together past warm-up (window {start:.3f}..{end:.3f})")
    return start, end


def samples_per_second(reports: Sequence[dict[str, Any]], warmup_batches: int) -> list[float]:
    """Each process's samples per second over :func:`common_window`."""
    start, end = common_window(reports, warmup_batches)
    return [
        report["batch_size"] * sum(start < t <= end for t in report["batch_ends"]) / (end - start)
        for report in reports
    ]


def time_to_accuracy(reports: Sequence[dict[str, Any]], target: float) -> Optional[float]:
    """Seconds from the first process's first batch to the first evaluation, in any process, at >= ``target`` test
    accuracy, less the evaluation time that process had spent before it. ``None`` if no process got there."""
    start = min(report["started"] for report in reports)
    reached = [
        evaluation["time"] - evaluation["eval_seconds"]
        for report in reports
        for evaluation in report["evaluations"]
        if evaluation["accuracy"] >= target
    ]
    return min(reached) - start if reached else None


def steps_to_accuracy(reports: Sequence[dict[str, Any]], target: float) -> Optional[int]:
    """The optimizer step at which the first process reached ``target`` (see :func:`time_to_accuracy`)."""
    hits = [(e["time"] - e["eval_seconds"], e["step"]) for r in reports for e in r["evaluations"] if e["accuracy"] >= target]
    return min(hits)[1] if hits else None


def median_round_seconds(reports: Sequence[dict[str, Any]]) -> Optional[float]:
    """Median over all processes' successful rounds of :attr:`~lightning_moshpit.AveragingRound.seconds` (trigger to
    averaged gradients loaded); ``None`` outside moshpit or without a successful round."""
    seconds = [r.get("seconds", 0.0) for report in reports for r in report["rounds"] if r.get("group_size")]
    return statistics.median(seconds) if seconds else None


def profile_fields(reports: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The row entries a ``--profile`` table reads: the profiled process's summary and the runs' median round time."""
    return {"profile": reports[profiled_rank(len(reports))].get("profile"), "round_seconds": median_round_seconds(reports)}


def full_rounds(reports: Sequence[dict[str, Any]]) -> tuple[int, int]:
    """(averaging rounds that gathered every process, all rounds) over the reports; (0, 0) outside moshpit."""
    size = len(reports)
    rounds = [r for report in reports for r in report["rounds"]]
    return sum(r.get("group_size") == size for r in rounds), len(rounds)


def profiled_rank(processes: int) -> int:
    """The process a ``--profile`` run samples: rank 1 (a swarm's rank 0 also hosts the bootstrap DHT), or 0 alone."""
    return min(1, processes - 1)


def profile_args(workdir: Path, processes: int) -> list[list[str]]:
    """Per-process extra arguments that make :func:`profiled_rank` run py-spy on itself (raw stacks in ``workdir``)."""
    extra: list[list[str]] = [[] for _ in range(processes)]
    workdir.mkdir(parents=True, exist_ok=True)
    extra[profiled_rank(processes)] = ["--profile", str(workdir / "profile.txt")]
    return extra


def print_profiles(rows: Sequence[dict[str, Any]]) -> None:
    """Two tables from the rows' ``profile`` entries: where the profiled process's main thread spent its wall time
    (py-spy, idle samples included), and the CPU seconds per second of training of its threads and processes."""
    profiled = [row for row in rows if row.get("profile")]
    if not profiled:
        return
    phases: list[str] = []
    for row in profiled:
        phases += [name for name in row["profile"]["main_thread_phases"] if name not in phases]
    print("\nwall time of one process's main thread by phase (py-spy, idle samples included), share of its training")
    print("| phase | " + " | ".join(row["run"] for row in profiled) + " |")
    print("|---|" + "---|" * len(profiled))
    for name in phases:
        shares = [row["profile"]["main_thread_phases"].get(name, 0.0) for row in profiled]
        print(f"| {name} | " + " | ".join(f"{share:.0%}" for share in shares) + " |")
    rounds = [row for row in profiled if row.get("round_seconds") is not None]
    if rounds:
        print("\nmedian seconds from a peer's trigger to its averaged gradients (AveragingRound.seconds), all peers: "
              + ", ".join(f"{row['run']} {row['round_seconds']:.2f} s" for row in rounds))
    kinds = ["main thread", "other threads", "python children", "p2pd", "profiler"]
    print("\nCPU of the same process while it trained: CPU seconds per wall second (1.0 = one core busy); the total "
          "leaves out the profiler")
    print("| run | wall s | " + " | ".join(kinds) + " | total |")
    print("|---|---|" + "---|" * (len(kinds) + 1))
    for row in profiled:
        seconds, cpu = row["profile"]["seconds"], row["profile"]["cpu_seconds"]
        busy = [cpu.get(kind, 0.0) / seconds if seconds else 0.0 for kind in kinds]
        print(f"| {row['run']} | {seconds:.1f} | " + " | ".join(f"{b:.2f}" for b in busy) + f" | {sum(busy[:-1]):.2f} |")
