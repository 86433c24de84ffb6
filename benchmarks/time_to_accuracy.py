"""Time to accuracy: wall time until a small CNN reaches a fixed test accuracy on scikit-learn's digits.

Runs, all with the same model, initial weights, local batch, SGD settings and *global* batch (``--target-batch-size``
samples per optimizer step), under the same Lightning loop (``lightning_moshpit.testing.bench_peer``):

- **solo**: one process, ``accumulate_grad_batches = target / batch``;
- **ddp**: ``--processes`` gloo ranks, ``accumulate_grad_batches = target / (batch x processes)``;
- **moshpit**, **moshpit_dpu**: ``--processes`` peers with ``target_batch_size = target``, default mode and delayed
  parameter updates;
- the same multi-process runs again with the last process **throttled** (it sleeps ``--throttle-seconds`` more per
  batch): DDP waits for the slowest rank at every step, a swarm reaches its target batch with whatever the others
  compute meanwhile.

Every process evaluates the 360 held-out digits after each optimizer step; a run's time to accuracy is from the first
process's first batch to the first evaluation at ``--target-accuracy`` or above, less the evaluation time that process
spent before it. Process start-up (imports, DHT, gloo rendezvous, the swarm's start barrier) is reported apart.

**CPU share.** This machine may have fewer cores than processes. The model is tiny (a few ms of CPU per batch), and
``--compute-seconds`` adds a sleep per batch that stands in for accelerator work, which uses no CPU. Most of a batch's
time is then the same in every run whatever the number of processes, and what the CPU share still affects is the real
CPU work: the forward/backward passes and, for moshpit, hivemind's averaging processes and p2pd. The solo run has one
process and so one core to itself; the multi-process runs share the machine's cores. ``--compute-seconds 0`` measures
the raw CPU case.

    python benchmarks/time_to_accuracy.py            # 4 processes, target 512 (32 x 16), 0.1 s/batch: ~15 min
    python benchmarks/time_to_accuracy.py --compute-seconds 0 --out /tmp/tta_cpu.json --plot /tmp/tta_cpu.png

Wrap it in ``flock /tmp/swarm.lock`` on a machine shared with other multi-peer runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from lightning_moshpit.testing.launch import stop_swarms_on_sigterm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from training_runs import (  # noqa: E402
    SWARM_MODES,
    full_rounds,
    launch,
    print_profiles,
    profile_args,
    profile_fields,
    steps_to_accuracy,
    time_to_accuracy,
)

MODES = ("ddp", "moshpit", "moshpit_dpu")
TARGET_RATIO_TO_DDP = 1.1  # issue 8: 4-peer moshpit time to accuracy <= 1.1x DDP-gloo


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=4, help="DDP ranks / swarm peers")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--throttled-modes", nargs="*", choices=MODES, default=["ddp", "moshpit"],
                        help="modes run again with the last process throttled (none: skip)")  # fmt: skip
    parser.add_argument("--no-solo", action="store_true", help="skip the one-process run")
    parser.add_argument("--batch-size", type=int, default=16, help="local batch")
    parser.add_argument("--target-batch-size", type=int, default=512, help="samples per optimizer step, every run")
    parser.add_argument("--lr", type=float, default=0.3, help="SGD (momentum 0.9) learning rate")
    parser.add_argument("--width", type=int, default=16, help="CNN width")
    parser.add_argument("--target-accuracy", type=float, default=0.95)
    parser.add_argument("--compute-seconds", type=float, default=0.1, help="sleep per batch standing in for compute")
    parser.add_argument("--throttle-seconds", type=float, default=0.2, help="the straggler's extra sleep per batch")
    parser.add_argument("--max-batches", type=int, default=1600,
                        help="per process: give up after this many (solo needs about 1,300 by default)")  # fmt: skip
    parser.add_argument("--matchmaking-time", type=float, default=1.0)
    parser.add_argument("--averaging-timeout", type=float, default=10.0)
    parser.add_argument("--profile", action="store_true",
                        help="py-spy one process of every run (rank 1; idle samples too) and read its CPU from /proc")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/time_to_accuracy.json"))
    parser.add_argument("--plot", type=Path, default=Path("docs/benchmarks/time_to_accuracy.png"))
    args = parser.parse_args(argv)
    if args.processes < 2:
        parser.error(f"--processes must be >= 2 (it is compared with one process), got {args.processes}")
    share = args.batch_size * args.processes
    if args.target_batch_size % share:
        parser.error(f"--target-batch-size ({args.target_batch_size}) must be a multiple of --batch-size x "
                     f"--processes ({share}), so DDP's accumulation covers the same global batch")  # fmt: skip
    if not 0 < args.target_accuracy <= 1:
        parser.error(f"--target-accuracy must be in (0, 1], got {args.target_accuracy}")
    return args


def run(workdir: Path, name: str, mode: str, processes: int, common: list[str], args: argparse.Namespace,
        throttled: bool) -> dict[str, Any]:  # fmt: skip
    if mode == "solo":
        extra = ["--accumulate", str(args.target_batch_size // args.batch_size)]
    elif mode == "ddp":
        extra = ["--accumulate", str(args.target_batch_size // (args.batch_size * processes))]
    else:
        extra = ["--target-batch-size", str(args.target_batch_size)]
    if mode != "ddp":
        extra += ["--stop-file", str(workdir / name.replace(" ", "_") / "reached")]
    run_dir = workdir / name.replace(" ", "_")
    per_process = profile_args(run_dir, processes) if args.profile else [[] for _ in range(processes)]
    if throttled:
        per_process[-1] = [*per_process[-1], "--throttle-seconds", str(args.throttle_seconds)]
    started = time.monotonic()
    reports, launched = launch(run_dir, mode, processes, [*common, *extra], per_process, timeout=1800)
    seconds = time_to_accuracy(reports, args.target_accuracy)
    full, rounds = full_rounds(reports)
    row = {
        "run": name, "mode": mode, "processes": processes, "throttled": throttled,
        "time_to_accuracy": seconds, "steps_to_accuracy": steps_to_accuracy(reports, args.target_accuracy),
        "startup_seconds": min(r["started"] for r in reports) - launched,
        "final_accuracy": max(r["final_accuracy"] for r in reports),
        "batches": [len(r["batch_ends"]) for r in reports], "optimizer_steps": [r["optimizer_steps"] for r in reports],
        "rounds_full": full, "rounds": rounds, "wall_seconds": time.monotonic() - started,
        "curve": [(e["time"] - e["eval_seconds"] - min(r["started"] for r in reports), e["accuracy"])
                  for e in reports[0]["evaluations"]],
        **profile_fields(reports),
    }  # fmt: skip
    shown = f"{seconds:.1f} s" if seconds is not None else "not reached"
    print(f"  {name}: {shown} at step {row['steps_to_accuracy']} ({row['wall_seconds']:.0f} s)", flush=True)
    return row


def main(argv: Optional[list[str]] = None) -> None:
    stop_swarms_on_sigterm()  # a killed run stops its peers too
    args = parse_args(argv)
    load = os.getloadavg()[0]
    started = time.monotonic()
    common = ["--task", "digits", "--width", str(args.width), "--batch-size", str(args.batch_size), "--lr",
              str(args.lr), "--target-accuracy", str(args.target_accuracy), "--compute-seconds",
              str(args.compute_seconds), "--max-steps", str(args.max_batches), "--matchmaking-time",
              str(args.matchmaking_time), "--averaging-timeout", str(args.averaging_timeout)]  # fmt: skip
    plan = [] if args.no_solo else [("solo", "solo", 1, False)]
    plan += [(f"{mode} x{args.processes}", mode, args.processes, False) for mode in args.modes]
    plan += [(f"{mode} x{args.processes} throttled", mode, args.processes, True) for mode in args.throttled_modes]
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(Path(tmp), name, mode, n, common, args, throttled) for name, mode, n, throttled in plan]
    add_ratios(rows)
    print_table(rows, args)
    print_profiles(rows)
    report = {
        "command": "python benchmarks/time_to_accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rows": rows,
        "load_average_at_start": load,
        "cpus": os.cpu_count(),
        "total_seconds": time.monotonic() - started,
        "python": platform.python_version(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(rows, args)
    print(f"wrote {args.out} and {args.plot} ({report['total_seconds']:.0f} s; load average at start {load:.2f})")


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each run's time to accuracy over DDP's with the same throttling (``None`` where either did not get there)."""
    ddp = {row["throttled"]: row["time_to_accuracy"] for row in rows if row["mode"] == "ddp"}
    for row in rows:
        reference, own = ddp.get(row["throttled"]), row["time_to_accuracy"]
        row["ratio_to_ddp"] = own / reference if own is not None and reference else None


def print_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(f"\ndigits, CNN width {args.width}, local batch {args.batch_size}, {args.target_batch_size} samples per "
          f"optimizer step, lr {args.lr}, target accuracy {args.target_accuracy}, compute sleep "
          f"{args.compute_seconds} s/batch, straggler +{args.throttle_seconds} s/batch")  # fmt: skip
    print("| run | time to accuracy | ratio to DDP (same throttling) | optimizer steps to accuracy | start-up | "
          "rounds with all peers |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for row in rows:
        seconds = f"{row['time_to_accuracy']:.1f} s" if row["time_to_accuracy"] is not None else "not reached"
        ratio = f"{row['ratio_to_ddp']:.2f}" if row["ratio_to_ddp"] is not None else "–"
        rounds = f"{row['rounds_full']}/{row['rounds']}" if row["mode"] in SWARM_MODES and row["rounds"] else "–"
        print(f"| {row['run']} | {seconds} | {ratio} | {row['steps_to_accuracy']} | {row['startup_seconds']:.1f} s "
              f"| {rounds} |")  # fmt: skip
    best = [r["ratio_to_ddp"] for r in rows if r["mode"] in SWARM_MODES and not r["throttled"] and r["ratio_to_ddp"]]
    if best and args.processes == 4:
        verdict = "met" if min(best) <= TARGET_RATIO_TO_DDP else "missed"
        print(f"\ntarget (4-peer moshpit <= {TARGET_RATIO_TO_DDP}x DDP): {verdict}, best {min(best):.2f}x")


def plot(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for row in rows:
        if row["curve"]:
            ax.plot([p[0] for p in row["curve"]], [p[1] for p in row["curve"]], ls="--" if row["throttled"] else "-",
                    label=row["run"])  # fmt: skip
    ax.axhline(args.target_accuracy, color="grey", lw=0.8)
    ax.set_xlabel("seconds since the first batch (evaluation time excluded)")
    ax.set_ylabel("test accuracy (process 0)")
    ax.set_ylim(0, 1)
    ax.set_title(f"digits, {args.target_batch_size} samples per step, {os.cpu_count()} cores")
    ax.legend(fontsize=7)
    fig.tight_layout()
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=110)


if __name__ == "__main__":
    main()
