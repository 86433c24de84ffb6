"""ResIST and IST against full-model local SGD: 4 peers on 127.0.0.1, scikit-learn digits, equal wall-clock budget.

Four swarm runs, each of ``--peers`` real peer processes (``lightning_moshpit.testing.resist_peer``) that start
together, train for ``--seconds`` from their first batch, then run one last averaging round and evaluate:

- ``full`` vs ``resist`` on a pre-activation ResNet (depths 1-1-8-1, widths 16-32-64-64; the third stage is
  partitioned): full = the same holder-weighted averager with S=1 (every peer holds everything) and the optimizer
  state kept, i.e. plain local SGD averaging the whole model every ``--local-steps`` batches;
- ``full`` vs ``ist`` on an MLP 64-512-512-10.

Reported per run (mean over peers): held-out accuracy of each peer's final model (after the last round, so the whole
model), training batches per second per peer (averaging rounds included: the wall clock is what is equal) and the
same without the time spent in rounds, and bytes this peer sent per regular averaging round (all-reduce messages as
counted by ``HolderAverager.bytes_sent``).

    flock /tmp/swarm.lock python benchmarks/resist.py     # ~4 minutes; writes docs/benchmarks/resist.json and the
                                                          # table in docs/resist.md
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import time
import uuid
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from lightning_moshpit.testing.launch import LocalSwarm, stop_swarms_on_sigterm

TABLE_BEGIN, TABLE_END = "<!-- resist-benchmark:begin -->", "<!-- resist-benchmark:end -->"
PEER = "lightning_moshpit.testing.resist_peer"
RUNS = [("full", "preact"), ("resist", "preact"), ("full", "mlp"), ("ist", "mlp")]


def run(method: str, model: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    run_id = f"bench_{method}_{model}_{uuid.uuid4().hex[:8]}"
    peer_args = ["--method", method, "--model", model, "--min-peers", str(args.peers), "--seconds", str(args.seconds),
                 "--local-steps", str(args.local_steps), "--matchmaking-time", str(args.matchmaking_time),
                 "--averaging-timeout", "15"]  # fmt: skip
    if method != "full":
        peer_args += ["--subnets", str(args.subnets)]
    with LocalSwarm(workdir / run_id, run_id) as swarm:
        for index in range(args.peers):
            swarm.start_peer([*peer_args, "--data-seed", str(index)], module=PEER)
        codes = swarm.wait(timeout=args.seconds + 240)
        if any(codes):
            failed = next(i for i, code in enumerate(codes) if code)
            raise RuntimeError(f"{method}/{model}: peer {failed} exited {codes[failed]}:\n{swarm.log(failed)[-3000:]}")
        reports = [json.loads(swarm.report_path(i).read_text()) for i in range(args.peers)]
    regular = [r for report in reports for r in report["rounds"] if r["round"] >= 0]
    complete = [r for r in regular if r["group_size"] == args.peers]
    summary = {
        "method": method,
        "model": model,
        "parameters": reports[0]["parameters"],
        "num_subnets": reports[0]["num_subnets"],
        "test_accuracy": statistics.mean(r["test_accuracy"] for r in reports),
        "test_accuracy_by_peer": [r["test_accuracy"] for r in reports],
        "steps_per_second": statistics.mean(r["steps_per_second"] for r in reports),
        # the same, leaving out the time spent in averaging rounds: what the shallower sub-network buys in compute
        "compute_steps_per_second": statistics.mean(
            r["batches"] / max(1e-9, r["train_seconds"] - sum(x["seconds"] for x in r["rounds"] if x["round"] >= 0))
            for r in reports
        ),
        "batches_by_peer": [r["batches"] for r in reports],
        "rounds_per_peer": statistics.mean(sum(r["round"] >= 0 for r in rep["rounds"]) for rep in reports),
        "rounds_with_all_peers": f"{len(complete)}/{len(regular)}",
        "bytes_per_round": statistics.mean(r["bytes_sent"] for r in complete) if complete else float("nan"),
        "seconds_per_round": statistics.mean(r["seconds"] for r in complete) if complete else float("nan"),
    }
    print(json.dumps({k: v for k, v in summary.items() if not k.endswith("_by_peer")}), flush=True)
    return summary


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| model | method | S | test accuracy | steps/s per peer | steps/s outside rounds | bytes sent per round per "
        "peer | vs full | rounds with all peers |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    baseline: dict[str, dict[str, Any]] = {}
    for result in results:
        if result["method"] == "full":
            baseline[result["model"]] = result
        base = baseline.get(result["model"])
        ratio = result["bytes_per_round"] / base["bytes_per_round"] if base else float("nan")
        name = {"preact": "pre-act ResNet", "mlp": "MLP"}[result["model"]]
        lines.append(
            f"| {name} ({result['parameters'] / 1e3:.0f}k params) | {result['method']} | {result['num_subnets']} | "
            f"{result['test_accuracy']:.3f} | {result['steps_per_second']:.1f} | "
            f"{result['compute_steps_per_second']:.1f} | {result['bytes_per_round'] / 1e6:.3f} MB"
            f" | {ratio:.2f}x | {result['rounds_with_all_peers']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    stop_swarms_on_sigterm()  # a killed run stops its peers too
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--subnets", type=int, default=4, help="S for ResIST and IST")
    parser.add_argument("--seconds", type=float, default=40.0, help="training budget per run (wall clock)")
    parser.add_argument("--local-steps", type=int, default=20)
    parser.add_argument("--matchmaking-time", type=float, default=1.0)
    parser.add_argument("--runs", nargs="*", default=[f"{m}:{n}" for m, n in RUNS], help="method:model pairs")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/resist.json"))
    parser.add_argument("--doc", type=Path, default=Path("docs/resist.md"))
    args = parser.parse_args()
    started = time.time()
    results: list[dict[str, Any]] = []
    failures: list[str] = []
    with TemporaryDirectory(prefix="resist_bench_") as workdir:
        for pair in args.runs:
            method, model = pair.split(":")
            try:
                results.append(run(method, model, args, Path(workdir)))
            except (RuntimeError, TimeoutError) as error:  # report the other runs anyway, and say which one failed
                print(f"FAILED {pair}: {error}", flush=True)
                failures.append(f"{pair}: {str(error)[:2000]}")
    text = table(results)
    print(text)
    command = "python " + " ".join(sys.argv)
    report = {"command": command, "settings": {k: str(v) for k, v in vars(args).items()}, "results": results,
              "failures": failures, "platform": platform.platform(), "seconds": time.time() - started}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    if args.doc.exists():
        page = args.doc.read_text()
        pattern = re.compile(re.escape(TABLE_BEGIN) + ".*?" + re.escape(TABLE_END), re.S)
        failed = "".join(f"\nFailed run: {failure.splitlines()[0]}\n" for failure in failures)
        block = (f"{TABLE_BEGIN}\n*Measured with `{command}` on {platform.machine()} (2 shared cores).*\n\n{text}"
                 f"{failed}{TABLE_END}")  # fmt: skip
        args.doc.write_text(pattern.sub(lambda _: block, page))


if __name__ == "__main__":
    main()
