"""Does averaging hide behind compute? Wall time of a 2-peer swarm vs one peer doing the same per-peer work alone.

Each peer runs ``lightning_moshpit.testing.peer`` with a fixed sleep per batch standing in for compute, so a global
step carries ``--compute-per-step`` seconds of compute per peer. The solo baseline is plain Lightning (no strategy)
on one process with the same local steps; the swarm's target batch is twice the solo per-step share, so every peer
does the same work per global step as the solo run. Both are measured in this one run, from each peer's first
batch to its last (process start-up and the start barrier excluded), and the script prints the ratio.

    python benchmarks/overlap.py            # default: 2 peers, ~4 s of compute per global step, 6 global steps
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import uuid
from pathlib import Path

from lightning_moshpit.testing.launch import LocalSwarm, stop_swarms_on_sigterm


def training_seconds(report: dict) -> float:
    """From the end of the first batch to the end of the last one."""
    times = report["step_times"]
    return times[-1] - times[0]


def run(workdir: Path, peers: int, args: list[str], solo: bool, target: int, timeout: float) -> list[dict]:
    with LocalSwarm(workdir, f"bench_{uuid.uuid4().hex[:8]}", env={"MOSHPIT_TARGET_BATCH_SIZE": str(target)}) as swarm:
        for index in range(peers):
            extra = ["--solo"] if solo else ["--min-peers", str(peers)]
            swarm.start_peer([*args, *extra, "--seed", str(index)])
        codes = swarm.wait(timeout)
        if codes != [0] * peers:
            raise RuntimeError("\n".join(swarm.log(i)[-2000:] for i in range(peers)))
    return [json.loads(swarm.report_path(i).read_text()) for i in range(peers)]


def main() -> None:
    stop_swarms_on_sigterm()  # a killed run stops its peers too
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=2)
    parser.add_argument(
        "--compute-per-step", type=float, default=4.0, help="seconds of compute per peer per global step"
    )
    parser.add_argument("--global-steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches-per-step", type=int, default=40, help="local batches per peer per global step")
    parser.add_argument("--matchmaking-time", type=float, default=2.0)
    parser.add_argument("--dpu", action="store_true", help="also measure delayed parameter updates")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/overlap.json"))
    args = parser.parse_args()

    per_batch = args.compute_per_step / args.batches_per_step
    local_steps = args.global_steps * args.batches_per_step
    share = args.batches_per_step * args.batch_size  # samples one peer contributes per global step
    common = ["--batch-size", str(args.batch_size), "--compute-seconds", f"{per_batch:.4f}", "--max-steps",
              str(local_steps), "--matchmaking-time", str(args.matchmaking_time), "--averaging-timeout", "30"]  # fmt: skip
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        solo = run(Path(tmp) / "solo", 1, common, solo=True, target=share, timeout=600)
        results["solo"] = training_seconds(solo[0])
        modes = [("moshpit", [])] + ([("moshpit_dpu", ["--dpu"])] if args.dpu else [])
        for name, flags in modes:
            started = time.monotonic()
            reports = run(Path(tmp) / name, args.peers, [*common, *flags], solo=False, target=share * args.peers,
                          timeout=900)  # fmt: skip
            results[name] = max(training_seconds(r) for r in reports)
            results[f"{name}_global_steps"] = [r["global_step"] for r in reports]
            results[f"{name}_rounds_full"] = sum(
                x["group_size"] == args.peers for r in reports for x in r["rounds"]
            )  # fmt: skip
            results[f"{name}_rounds"] = sum(len(r["rounds"]) for r in reports)
            results[f"{name}_process_seconds"] = time.monotonic() - started

    print(f"{args.peers} peers, {args.compute_per_step:.1f} s compute per peer per global step, "
          f"{args.global_steps} global steps, matchmaking {args.matchmaking_time} s")  # fmt: skip
    print(f"{'run':<14}{'training s':>12}{'ratio to solo':>16}{'global steps':>16}{'full rounds':>14}")
    print(f"{'solo':<14}{results['solo']:>12.1f}{1.0:>16.2f}{'':>16}{'':>14}")
    for name, _ in modes:
        ratio = results[name] / results["solo"]
        results[f"{name}_ratio"] = ratio
        full = f"{results[f'{name}_rounds_full']}/{results[f'{name}_rounds']}"
        print(f"{name:<14}{results[name]:>12.1f}{ratio:>16.2f}{str(results[f'{name}_global_steps']):>16}{full:>14}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "results": results}, indent=2))


if __name__ == "__main__":
    main()
