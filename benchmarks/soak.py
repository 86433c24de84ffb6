"""Soak run: each swarm setting K times, with real peer processes on 127.0.0.1; pass rate and full-round share.

Each row starts ``python -m lightning_moshpit.testing.peer`` processes (``Trainer.fit(strategy=MoshpitStrategy(...))``)
that stop at the swarm's global step ``--steps`` (``MoshpitStrategy(max_global_steps=...)``, with its final parameter
round). A run **passes** when every peer that should finish exits 0 at that global step, and their final parameters and
floating buffers agree within 1e-6 (one model), and, for the crash row, when no survivor stalled longer than
``averaging_timeout``. Partial all-reduces (a member sent nothing, e.g. the paused one) do not fail a run: they are
failed rounds in the share below, and their log lines are counted.

The **full-round share** counts gradient-averaging rounds (``AveragingRound``) over all runs of a row: a round is full
when it succeeded (a partial all-reduce, where a member sent nothing, counts as failed) and its group held every live
peer. In the fixed-size rows "every live peer" is every peer of the run (on a grid, every peer of the round's grid
bucket, computed from the run's size). In the join, pause and crash rows the swarm
changes size, so it is the swarm size the peer's progress tracker saw when the round ended. Rounds at the last global
step are left out (peers that stop leave). Local-updates peers average parameters, not gradients, and record no
``AveragingRound``: that row reports passes only.

Usage::

    python benchmarks/soak.py                    # every row, 10 runs each (about 2 hours on 2 cores)
    python benchmarks/soak.py --runs 3 --rows "2 peers, fast" "crash (1 of 4)"
    python benchmarks/soak.py --runs 5 --append   # 5 more runs per row, added to docs/benchmarks/soak.json

Writes ``docs/benchmarks/soak.json`` and prints the Markdown table that ``docs/fault_tolerance.md`` carries.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable, Optional

from lightning_moshpit.averaging import grid_bucket
from lightning_moshpit.testing.launch import LocalSwarm, partial_allreduce_lines, stop_swarms_on_sigterm

MATCHMAKING_TIME = 1.0
AVERAGING_TIMEOUT = 10.0
FAST = ["--batch-size", "32", "--compute-seconds", "0", "--samples", "8192"]
SLOW = ["--batch-size", "16", "--compute-seconds", "0.05"]
#: a cap far above what any row needs: the swarm's global step ends every run
LOCAL_STEP_CAP = ["--max-steps", "100000"]


@dataclasses.dataclass
class RunResult:
    passed: bool
    full_rounds: int
    rounds: int
    seconds: float
    longest_stall: Optional[float] = None
    why: str = ""
    #: lines in which hivemind reported a partial all-reduce (such rounds count as failed in ``full_rounds``)
    partial_lines: int = 0


@dataclasses.dataclass
class Row:
    name: str
    run: Callable[[Path, int], RunResult]


def peer_args(speed: list[str], num_peers: int, steps: int, extra: tuple[str, ...] = ()) -> list[str]:
    return [*speed, *LOCAL_STEP_CAP, "--matchmaking-time", str(MATCHMAKING_TIME), "--averaging-timeout",
            str(AVERAGING_TIMEOUT), "--min-peers", str(num_peers), "--end-at-global-step", str(steps), *extra]  # fmt: skip


def target_for(speed: list[str], num_peers: int) -> int:
    """Samples per global step: about 1-2 s of the swarm's compute, so a row of ~10 steps takes under a minute."""
    return (1024 if speed is FAST else 256) * max(1, num_peers // 2)


def judge(swarm: LocalSwarm, finishers: list[int], steps: int, live: Optional[int], stall_limit: Optional[float] = None,
          started: float = 0.0, group_size: int = 16) -> RunResult:  # fmt: skip
    """Pass/fail and round counts of a finished run (``live``: fixed swarm size, or None to use each round's view).

    On a full grid (``live`` = M^d peers, ``group_size`` M) a complete round holds the peers of one grid bucket, M
    or fewer depending on the round's dimension: computed here from the run's size, not taken from the peers."""
    seconds = time.monotonic() - started
    reports = [json.loads(swarm.report_path(i).read_text()) for i in finishers]
    why = []
    final_steps = [report["global_step"] for report in reports]
    if any(step != steps for step in final_steps):
        why.append(f"final global steps {final_steps}, expected {steps}")
    for key in ("final_params", "final_buffers"):
        first = reports[0][key]
        gap = max((abs(a - b) for report in reports[1:] for a, b in zip(first, report[key])), default=0.0)
        if gap > 1e-6:
            why.append(f"{key} differ by {gap:.2e}")
    partial = len(partial_allreduce_lines("\n".join(swarm.log(i) for i in range(len(swarm.processes)))))
    full = total = 0
    for report in reports:
        for record in report["rounds"]:
            if record["epoch"] >= steps - 1:
                continue
            total += 1
            if live is not None:
                wanted = grid_bucket(0, live, group_size, record["epoch"])[1]
            else:
                wanted = min(record["swarm_size"], group_size)
            full += bool(record["succeeded"] and record["group_size"] >= wanted)
    stall = None
    if stall_limit is not None:
        stall = max(longest_stall_after_first_step(report) for report in reports)
        if stall > stall_limit:
            why.append(f"a survivor stalled {stall:.1f} s > {stall_limit} s")
    return RunResult(not why, full, total, seconds, stall, "; ".join(why), partial)


def longest_stall_after_first_step(report: dict) -> float:
    times = report["step_times"]
    return max((b - a for a, b in zip(times, times[1:])), default=0.0)


def finish(swarm: LocalSwarm, timeout: float, indices: Optional[list[int]] = None) -> Optional[str]:
    """Wait for the peers; a reason string if one failed or hung (then every peer is stopped)."""
    indices = list(range(len(swarm.processes))) if indices is None else indices
    deadline = time.monotonic() + timeout
    for index in indices:
        try:
            code = swarm.processes[index].wait(timeout=max(0.1, deadline - time.monotonic()))
        except Exception:  # noqa: BLE001 - a hung peer is a failed run, reported with its log tail
            return f"peer {index} did not finish within {timeout:.0f} s: {swarm.log(index)[-600:]}"
        if code != 0:
            return f"peer {index} exited {code}: {swarm.log(index)[-600:]}"
    return None


def fixed_swarm(num_peers: int, speed: list[str], steps: int = 10, extra: tuple[str, ...] = (),
                group_size: int = 16) -> Callable[[Path, int], RunResult]:  # fmt: skip
    def run(workdir: Path, seed: int) -> RunResult:
        started = time.monotonic()
        env = {"MOSHPIT_TARGET_BATCH_SIZE": str(target_for(speed, num_peers))}
        with LocalSwarm(workdir, f"soak-{uuid.uuid4().hex[:8]}", env=env) as swarm:
            for index in range(num_peers):
                swarm.start_peer([*peer_args(speed, num_peers, steps, extra), "--group-size", str(group_size),
                                  "--seed", str(seed * 100 + index)])  # fmt: skip
            failure = finish(swarm, 120 + 30 * num_peers)
            if failure:
                return RunResult(False, 0, 0, time.monotonic() - started, why=failure)
            return judge(swarm, list(range(num_peers)), steps, num_peers, started=started, group_size=group_size)

    return run


def late_joiner(workdir: Path, seed: int, steps: int = 12) -> RunResult:
    started = time.monotonic()
    progress = workdir / "progress"
    with LocalSwarm(workdir, f"soak-{uuid.uuid4().hex[:8]}", env={"MOSHPIT_TARGET_BATCH_SIZE": "256"}) as swarm:
        for index in range(2):
            extra = ["--progress-file", str(progress)] if index == 0 else []
            swarm.start_peer([*peer_args(SLOW, 2, steps), "--seed", str(seed * 100 + index), *extra])
        swarm.wait_for_global_step(progress, 3, timeout=120)
        swarm.start_peer([*peer_args(SLOW, 1, steps), "--seed", str(seed * 100 + 2)])
        failure = finish(swarm, 240)
        if failure:
            return RunResult(False, 0, 0, time.monotonic() - started, why=failure)
        return judge(swarm, [0, 1, 2], steps, None, started=started)


def pause(workdir: Path, seed: int, steps: int = 14) -> RunResult:
    started = time.monotonic()
    progress = workdir / "progress"
    with LocalSwarm(workdir, f"soak-{uuid.uuid4().hex[:8]}", env={"MOSHPIT_TARGET_BATCH_SIZE": "384"}) as swarm:
        for index in range(3):
            extra = ["--progress-file", str(progress)] if index == 0 else []
            swarm.start_peer([*peer_args(SLOW, 3, steps), "--seed", str(seed * 100 + index), *extra])
        swarm.wait_for_global_step(progress, 3, timeout=120)
        swarm.signal_peer(2, signal.SIGSTOP)
        time.sleep(AVERAGING_TIMEOUT + 5)
        swarm.signal_peer(2, signal.SIGCONT)
        failure = finish(swarm, 240)
        if failure:
            return RunResult(False, 0, 0, time.monotonic() - started, why=failure)
        return judge(swarm, [0, 1, 2], steps, None, started=started)


def crash(workdir: Path, seed: int, steps: int = 12) -> RunResult:
    started = time.monotonic()
    progress = workdir / "progress"
    with LocalSwarm(workdir, f"soak-{uuid.uuid4().hex[:8]}", env={"MOSHPIT_TARGET_BATCH_SIZE": "512"}) as swarm:
        for index in range(4):
            extra = ["--progress-file", str(progress)] if index == 0 else []
            swarm.start_peer([*peer_args(SLOW, 4, steps), "--seed", str(seed * 100 + index), *extra])
        swarm.wait_for_global_step(progress, 3, timeout=150)
        swarm.signal_peer(3, signal.SIGKILL)
        failure = finish(swarm, 300, [0, 1, 2])
        if failure:
            return RunResult(False, 0, 0, time.monotonic() - started, why=failure)
        return judge(swarm, [0, 1, 2], steps, None, stall_limit=AVERAGING_TIMEOUT, started=started)


ROWS = [
    Row("2 peers, fast", fixed_swarm(2, FAST)),
    Row("2 peers, slow, BatchNorm", fixed_swarm(2, SLOW, extra=("--batch-norm",))),
    Row("4 peers, fast", fixed_swarm(4, FAST)),
    Row("4 peers, slow, BatchNorm", fixed_swarm(4, SLOW, extra=("--batch-norm",))),
    Row("4 peers, grid group_size 2", fixed_swarm(4, SLOW, group_size=2)),
    Row("8 peers, fast", fixed_swarm(8, FAST, steps=8)),
    Row("8 peers, slow", fixed_swarm(8, SLOW, steps=8)),
    Row("8 peers, grid group_size 4", fixed_swarm(8, SLOW, steps=8, group_size=4)),
    Row("DPU, 3 peers", fixed_swarm(3, SLOW, extra=("--dpu",))),
    Row("local updates, 3 peers", fixed_swarm(3, SLOW, extra=("--local-updates",))),
    Row("late joiner (2 + 1)", late_joiner),
    Row("pause (1 of 3)", pause),
    Row("crash (1 of 4)", crash),
]


def table(results: dict[str, list[RunResult]]) -> str:
    lines = ["| setting | passes | rounds with every live peer | partial all-reduce lines | longest survivor stall (s) "
             "| seconds per run |", "|---|---|---|---|---|---|"]  # fmt: skip
    for name, runs in results.items():
        full, total = sum(r.full_rounds for r in runs), sum(r.rounds for r in runs)
        share = f"{full}/{total} ({100 * full / total:.1f}%)" if total else "n/a (no gradient rounds)"
        stalls = [r.longest_stall for r in runs if r.longest_stall is not None]
        stall = f"{max(stalls):.1f}" if stalls else "-"
        lines.append(f"| {name} | {sum(r.passed for r in runs)}/{len(runs)} | {share} | "
                     f"{sum(r.partial_lines for r in runs)} | {stall} | "
                     f"{sum(r.seconds for r in runs) / len(runs):.0f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    stop_swarms_on_sigterm()  # a killed run stops its peers too
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10, help="runs per row (K)")
    parser.add_argument("--rows", nargs="*", default=None, help="only these rows (names as in the table)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs/benchmarks/soak.json")
    parser.add_argument("--append", action="store_true", help="add these runs to those already in --out")
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep every run's peer logs and reports under this folder (default: a temporary one)")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error(f"--runs must be at least 1, got {args.runs}")
    names = [row.name for row in ROWS]
    unknown = sorted(set(args.rows or []) - set(names))
    if unknown:
        parser.error(f"unknown --rows {unknown}; choose from {names}")
    rows = [row for row in ROWS if args.rows is None or row.name in args.rows]
    results: dict[str, list[RunResult]] = {}
    if args.append and args.out.exists():
        earlier = json.loads(args.out.read_text())["rows"]
        results = {name: [RunResult(**run) for run in runs] for name, runs in earlier.items()}
    with tempfile.TemporaryDirectory(prefix="moshpit-soak-") as temporary:
        scratch = args.keep or temporary
        for index, row in enumerate(rows):
            for k in range(args.runs):
                result = row.run(Path(scratch) / f"row{index}-run{k}", k)
                results.setdefault(row.name, []).append(result)
                status = "pass" if result.passed else f"FAIL: {result.why}"
                print(f"[soak] {row.name} run {k + 1}/{args.runs}: {status}; {result.full_rounds}/{result.rounds} "
                      f"full rounds; {result.seconds:.0f} s", flush=True)  # fmt: skip
                write_results(args.out, results)  # after every run: an interrupted soak keeps its figures
    print(table(results))


def write_results(path: Path, results: dict[str, list[RunResult]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = {name: [dataclasses.asdict(r) for r in runs] for name, runs in results.items()}
    path.write_text(json.dumps({"rows": rows, "table": table(results)}, indent=1) + "\n")


if __name__ == "__main__":
    main()
