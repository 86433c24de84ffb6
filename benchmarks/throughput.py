"""Training throughput: samples/s per peer for one process alone, DDP (gloo) and moshpit (default, DPU, local updates).

Every process trains the same model (a 3-conv CNN on random 3x32x32 images, ``--width`` channels), with the same local
batch and SGD, under the same Lightning loop (``lightning_moshpit.testing.bench_peer``); only the strategy differs.
For each ratio R = target_batch_size / local batch in ``--ratios``:

- **ddp**: N gloo ranks with ``accumulate_grad_batches = R / N``, so one optimizer step covers the same R local
  batches as a moshpit global step (DDP all-reduces only on the last batch of an accumulation, like moshpit);
- **moshpit**, **moshpit_dpu**, **moshpit_local**: N peers with ``target_batch_size = R x batch``, started together
  behind the ``min_peers`` barrier, in the default mode, with delayed parameter updates and with local updates.

**The CPU-share problem and the baseline.** On a machine with C cores, N > C processes each get about C/N of a core,
so comparing an N-peer swarm with one process alone measures the CPU split, not communication. The baseline is
therefore **solo xN**: N independent processes training alone *at the same time*; the ratio to solo is each run's mean
per-process samples/s divided by solo xN's. Both sides then have the same number of training processes on the same
cores; what the swarm adds (hivemind's averager and DHT processes, p2pd, waiting for groups) is what the ratio
measures. On a machine where every peer has its own cores this overhead lands on that peer alone, so the ratio here is
a pessimistic estimate for CPU-bound peers. One process alone (**solo x1**) is printed too, for reference.

Each process's rate is measured over the span in which every process of the run was past warm-up (one global step,
at least 2 batches) and none had finished, so all of them shared the CPU for the whole span.

    python benchmarks/throughput.py                      # 4 peers, R = 4 16 32 64: about 15 min on 2 cores
    python benchmarks/throughput.py --peers 2 --ratios 8 32 --global-steps 8 --width 64    # scale up or down

Wrap it in ``flock /tmp/swarm.lock`` on a machine shared with other multi-peer runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lightning_moshpit.testing.launch import stop_swarms_on_sigterm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from training_runs import (  # noqa: E402
    SWARM_MODES,
    full_rounds,
    launch,
    print_profiles,
    profile_args,
    profile_fields,
    samples_per_second,
)

MODES = ("ddp", *SWARM_MODES)
TARGET_RATIO, TARGET_PEERS, TARGET_KEEP = 32, 4, 0.9  # issue 8: R >= 32 and DPU: each of 4 peers keeps >= 90% of solo


def batches_per_process(ratio: int, peers: int, global_steps: int, min_batches: int) -> tuple[int, int]:
    """(warm-up batches, total batches) per process: warm-up is one global step (at least 2 batches); the measured
    part is ``global_steps`` global steps and at least ``min_batches`` batches."""
    per_step = max(1, ratio // peers)
    warmup = max(2, per_step)
    return warmup, warmup + max(min_batches, global_steps * per_step)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=4, help="processes per run (DDP ranks, swarm peers, solo xN)")
    parser.add_argument("--ratios", type=int, nargs="+", default=[4, 16, 32, 64],
                        help="target_batch_size / local batch (DDP: accumulate = ratio / peers)")  # fmt: skip
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--batch-size", type=int, default=32, help="local batch")
    parser.add_argument("--width", type=int, default=32, help="CNN width (compute per batch grows ~ width^2)")
    parser.add_argument("--global-steps", type=int, default=4, help="measured global steps per run")
    parser.add_argument("--min-batches", type=int, default=8, help="measured local batches per process, at least")
    parser.add_argument("--compute-seconds", type=float, default=0.0,
                        help="extra sleep per batch standing in for accelerator compute (uses no CPU)")  # fmt: skip
    parser.add_argument("--matchmaking-time", type=float, default=2.0)
    parser.add_argument("--averaging-timeout", type=float, default=15.0)
    parser.add_argument("--profile", action="store_true",
                        help="py-spy one process of every run (rank 1; idle samples too) and read its CPU from /proc: "
                             "where its wall time and CPU go. The profiler takes CPU too: compare profiled runs "
                             "with each other")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/throughput.json"))
    parser.add_argument("--plot", type=Path, default=Path("docs/benchmarks/throughput.png"))
    args = parser.parse_args(argv)
    for name in ("peers", "batch_size", "width", "global_steps", "min_batches"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    bad = [r for r in args.ratios if r < 1]
    if bad:
        parser.error(f"--ratios must be positive integers, got {bad}")
    return args


def measure(workdir: Path, name: str, mode: str, processes: int, common: list[str], warmup: int,
            batches: int, profile: bool = False) -> dict[str, Any]:  # fmt: skip
    started = time.monotonic()
    args = [*common, "--max-steps", str(batches)]
    try:
        extra = profile_args(workdir / name, processes) if profile else None
        reports, _ = launch(workdir / name, mode, processes, args, extra)
    except RuntimeError as error:  # seen once on a loaded machine: a peer's p2pd missed the bootstrap peer for 30 s
        if "Could not join the swarm" not in str(error):
            raise
        print(f"  {name}: a peer could not join the swarm; running it again once", flush=True)
        extra = profile_args(workdir / f"{name} again", processes) if profile else None
        reports, _ = launch(workdir / f"{name} again", mode, processes, args, extra)
    note = ""
    try:
        rates = samples_per_second(reports, warmup)
    except ValueError as error:  # e.g. one peer started training long after the others had finished
        note = f"no common span ({error}); each process's own span after warm-up"
        rates = [samples_per_second([report], warmup)[0] for report in reports]
    full, rounds = full_rounds(reports)
    row = {
        "run": name, "mode": mode, "processes": processes, "batches": batches, "warmup_batches": warmup,
        "per_process": rates, "per_peer": statistics.mean(rates), "total": sum(rates), "note": note,
        "first_batch_offsets": [r["batch_ends"][0] - min(x["batch_ends"][0] for x in reports) for r in reports],
        "optimizer_steps": [r["optimizer_steps"] for r in reports], "rounds_full": full, "rounds": rounds,
        "wall_seconds": time.monotonic() - started, **profile_fields(reports),
    }  # fmt: skip
    print(f"  {name}: {row['per_peer']:.1f} samples/s per process ({row['wall_seconds']:.0f} s) {note}", flush=True)
    return row


def main(argv: list[str] | None = None) -> None:
    stop_swarms_on_sigterm()  # a killed run stops its peers too
    args = parse_args(argv)
    load = os.getloadavg()[0]
    started = time.monotonic()
    common = ["--task", "synthetic", "--width", str(args.width), "--batch-size", str(args.batch_size),
              "--compute-seconds", str(args.compute_seconds), "--matchmaking-time", str(args.matchmaking_time),
              "--averaging-timeout", str(args.averaging_timeout)]  # fmt: skip
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        _, solo_batches = batches_per_process(max(args.ratios), args.peers, args.global_steps, args.min_batches)
        solo_batches = min(solo_batches, 2 + 4 * args.min_batches)  # the rate of a lone process settles quickly
        rows.append(measure(workdir, "solo x1", "solo", 1, common, 2, solo_batches, args.profile))
        rows.append(measure(workdir, f"solo x{args.peers}", "solo", args.peers, common, 2, solo_batches, args.profile))
        for ratio in args.ratios:
            warmup, batches = batches_per_process(ratio, args.peers, args.global_steps, args.min_batches)
            for mode in args.modes:
                extra = ["--target-batch-size", str(ratio * args.batch_size)]
                if mode == "ddp":
                    extra = ["--accumulate", str(max(1, ratio // args.peers))]
                name = f"{mode} R={ratio}"
                row = measure(workdir, name, mode, args.peers, [*common, *extra], warmup, batches, args.profile)
                rows.append({**row, "ratio": ratio})
    solo_alone, solo_shared = rows[0]["per_peer"], rows[1]["per_peer"]
    for row in rows:
        row["ratio_to_solo_shared"] = row["per_peer"] / solo_shared
        row["ratio_to_solo_alone"] = row["per_peer"] / solo_alone
    print_table(rows, args)
    print_profiles(rows)
    report = {
        "command": "python benchmarks/throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
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


def print_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(f"\n{args.peers} processes per run, local batch {args.batch_size}, CNN width {args.width}, "
          f"compute sleep {args.compute_seconds} s/batch, matchmaking {args.matchmaking_time} s")  # fmt: skip
    print("| R = target / local batch | run | samples/s per process | ratio to solo (same CPU share) | "
          "ratio to solo alone | optimizer steps | rounds with all peers |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        rounds = f"{row['rounds_full']}/{row['rounds']}" if row["mode"] in SWARM_MODES else "–"
        steps = min(row["optimizer_steps"]) if row["mode"] != "solo" else "–"
        flag = " (*)" if row["note"] else ""
        print(f"| {row.get('ratio', '–')} | {row['run'].split(' R=')[0]}{flag} | {row['per_peer']:.1f} | "
              f"{row['ratio_to_solo_shared']:.2f} | {row['ratio_to_solo_alone']:.2f} | {steps} | {rounds} |")  # fmt: skip
    if any(row["note"] for row in rows):
        print("(*) the processes never all trained at the same time after warm-up; rates over each one's own span")
    dpu = [r for r in rows if r["mode"] == "moshpit_dpu" and r.get("ratio", 0) >= TARGET_RATIO]
    if dpu and args.peers == TARGET_PEERS:
        worst = min(r["ratio_to_solo_shared"] for r in dpu)
        verdict = "met" if worst >= TARGET_KEEP else "missed"
        print(f"\ntarget (R >= {TARGET_RATIO}, DPU, {TARGET_PEERS} peers keep >= {TARGET_KEEP:.0%} of solo): "
              f"{verdict}, worst {worst:.2f}")  # fmt: skip


def plot(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for mode in args.modes:
        points = sorted((r["ratio"], r["ratio_to_solo_shared"]) for r in rows if r["mode"] == mode)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=mode)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.axhline(TARGET_KEEP, color="grey", lw=0.8, ls="--", label=f"target {TARGET_KEEP:.0%} (R >= {TARGET_RATIO}, DPU)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("target_batch_size / local batch")
    ax.set_ylabel(f"samples/s per process / solo x{args.peers}")
    ax.set_title(f"{args.peers} processes on {os.cpu_count()} cores, local batch {args.batch_size}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=110)


if __name__ == "__main__":
    main()
