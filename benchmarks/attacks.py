"""Can one Byzantine peer wreck a swarm? Final test accuracy under attack, with the mean and with CenteredClip.

Four real peers (``lightning_moshpit.testing.peer``) train a small MLP on scikit-learn's digits on 127.0.0.1; the last
one is Byzantine (``--attack``, see :mod:`lightning_moshpit.testing.attacks`). For every attack the script runs the
swarm twice, with ``aggregation="mean"`` and ``"centered_clip"``, plus two runs without an attacker (four honest peers,
each aggregation). Every peer stops when the swarm reaches ``--global-steps``; the script reports the honest peers'
held-out accuracy then (mean and worst) and writes:

- ``docs/benchmarks/attacks.json``: every figure;
- the table between the ``attack-table`` markers in ``docs/security.md``.

It also measures CenteredClip's overhead against the mean in the same run: seconds per gradient-averaging round in the
two attack-free runs (as the training process sees it, waiting for the group included), and the reduction's compute
alone on one all-reduce piece (4 senders, 131,072 floats: hivemind's largest part).

    python benchmarks/attacks.py                 # every attack, about 20 minutes on 2 cores
    python benchmarks/attacks.py --attacks nan   # one attack (plus the two attack-free runs)
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable, Optional

import torch

from lightning_moshpit.clipping import centered_clip
from lightning_moshpit.testing.attacks import ATTACKS
from lightning_moshpit.testing.launch import LocalSwarm

TABLE_MARKERS = ("<!-- attack-table:start -->", "<!-- attack-table:end -->")
OVERHEAD_MARKERS = ("<!-- attack-overhead:start -->", "<!-- attack-overhead:end -->")
AGGREGATIONS = ("mean", "centered_clip")


def run_swarm(workdir: Path, args: argparse.Namespace, attack: str, aggregation: str) -> dict:
    """One swarm of ``args.peers`` peers, the last one running ``attack``; returns the honest peers' figures."""
    common = ["--task", "digits", "--hidden", str(args.hidden), "--lr", str(args.lr), "--batch-size",
              str(args.batch_size), "--max-steps", str(args.local_steps), "--max-global-steps", str(args.global_steps),
              "--min-peers", str(args.peers),
              "--matchmaking-time", str(args.matchmaking_time), "--averaging-timeout", str(args.averaging_timeout),
              "--aggregation", aggregation]  # fmt: skip
    env = {"MOSHPIT_TARGET_BATCH_SIZE": str(args.target_batch_size)}
    started = time.monotonic()
    with LocalSwarm(workdir, f"attacks_{uuid.uuid4().hex[:8]}", env=env) as swarm:
        for index in range(args.peers):
            byzantine = attack != "none" and index == args.peers - 1
            swarm.start_peer([*common, "--seed", str(index), *(["--attack", attack] if byzantine else [])])
        codes = swarm.wait(args.run_timeout)
        honest = range(args.peers - 1) if attack != "none" else range(args.peers)
        if any(codes[i] != 0 for i in honest):
            raise RuntimeError("\n".join(swarm.log(i)[-2000:] for i in honest))
        reports = [json.loads(swarm.report_path(i).read_text()) for i in honest]
        flagged = sum("CenteredClip: peer" in swarm.log(i) for i in honest)
    accuracies = [r["test_accuracy"] for r in reports]
    round_seconds = [s for r in reports for s in r["round_seconds"]]
    return {
        "attack": attack,
        "aggregation": aggregation,
        "accuracy_mean": statistics.fmean(accuracies),
        "accuracy_min": min(accuracies),
        "test_loss_mean": statistics.fmean(r["test_loss"] for r in reports),
        "global_steps": [r["global_step"] for r in reports],
        "rounds": sum(len(r["rounds"]) for r in reports),
        "rounds_succeeded": sum(x["succeeded"] for r in reports for x in r["rounds"]),
        "round_seconds_median": statistics.median(round_seconds) if round_seconds else None,
        "honest_peers_that_logged_an_outlier": flagged,
        "attacker_exit_code": codes[-1] if attack != "none" else None,
        "wall_seconds": time.monotonic() - started,
    }


def reduction_seconds(repeats: int = 20, senders: int = 4, size: int = 2**17) -> dict[str, float]:
    """Compute time of one reducer piece: hivemind's weighted mean vs CenteredClip (10 iterations, adaptive τ)."""
    torch.set_num_threads(1)
    parts = torch.randn(senders, size)
    parts[-1] *= -1000
    weights = torch.full((senders,), 32.0)

    def timed(function: Callable[[], object]) -> float:
        function()
        started = time.perf_counter()
        for _ in range(repeats):
            function()
        return (time.perf_counter() - started) / repeats

    mean = timed(lambda: (weights[:, None] * parts).sum(0) / weights.sum())
    clip = timed(lambda: centered_clip(parts, weights=weights.tolist()))
    return {"mean_seconds": mean, "centered_clip_seconds": clip, "ratio": clip / mean}


def table(results: list[dict], baseline: dict[str, float]) -> str:
    """The markdown table for docs/security.md."""
    def cell(row: dict) -> str:
        return f"{100 * row['accuracy_mean']:.1f} (worst {100 * row['accuracy_min']:.1f})"

    by_key = {(r["attack"], r["aggregation"]): r for r in results}
    lines = [
        "| attack (1 of 4 peers) | mean: accuracy % | centered_clip: accuracy % | clip vs no attack (points) |",
        "|---|---|---|---|",
    ]
    for attack in dict.fromkeys(r["attack"] for r in results):
        mean, clip = by_key.get((attack, "mean")), by_key.get((attack, "centered_clip"))
        gap = f"{100 * (clip['accuracy_mean'] - baseline['centered_clip']):+.1f}" if clip and attack != "none" else ""
        lines.append(f"| {attack} | {cell(mean) if mean else '-'} | {cell(clip) if clip else '-'} | {gap} |")
    return "\n".join(lines)


def overhead_text(overhead: dict) -> str:
    """One sentence with CenteredClip's cost against the mean."""
    compute = overhead["reduction"]
    ratio = overhead["round_ratio"]
    return (
        f"CenteredClip overhead, measured in the same run: a gradient-averaging round took a median "
        f"{overhead['round_seconds_centered_clip']:.3f} s with centered_clip against {overhead['round_seconds_mean']:.3f} s "
        f"with the mean in the attack-free runs (ratio {ratio:.2f}; as the training process sees it, waiting for the "
        f"group included). The reduction's compute alone, on one 131,072-float piece from 4 senders: "
        f"{1e3 * compute['centered_clip_seconds']:.2f} ms against {1e3 * compute['mean_seconds']:.2f} ms "
        f"(ratio {compute['ratio']:.1f})."
    )


def write_doc(path: Path, markers: tuple[str, str], text: str) -> None:
    """Replace what lies between ``markers`` in ``path`` by ``text``."""
    start, end = markers
    doc = path.read_text()
    if start not in doc or end not in doc:
        raise RuntimeError(f"{path} has no {start} ... {end} markers")
    head, rest = doc.split(start, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{start}\n{text}\n{end}{tail}")


def report(results: list[dict], overhead: dict, doc: Optional[Path]) -> None:
    """Print the table and the overhead, and write them into ``doc``."""
    baseline = {r["aggregation"]: r["accuracy_mean"] for r in results if r["attack"] == "none"}
    text = table(results, baseline)
    print()
    print(text)
    print()
    print(overhead_text(overhead))
    if doc is not None:
        write_doc(doc, TABLE_MARKERS, text)
        write_doc(doc, OVERHEAD_MARKERS, overhead_text(overhead))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attacks", nargs="+", default=[a for a in ATTACKS if a != "none"], choices=ATTACKS[1:])
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--global-steps", type=int, default=25, help="every peer stops at this swarm global step")
    parser.add_argument("--local-steps", type=int, default=1000, help="... or after this many local steps")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--target-batch-size", type=int, default=512)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--matchmaking-time", type=float, default=1.0)
    parser.add_argument("--averaging-timeout", type=float, default=10.0)
    parser.add_argument("--run-timeout", type=float, default=240.0)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/attacks.json"))
    parser.add_argument("--doc", type=Path, default=Path("docs/security.md"))
    parser.add_argument("--from-json", action="store_true", help="only rewrite --doc from --out, run nothing")
    args = parser.parse_args()
    if args.from_json:
        saved = json.loads(args.out.read_text())
        report(saved["results"], saved["overhead"], args.doc)
        return

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for attack in ["none", *args.attacks]:
            for aggregation in AGGREGATIONS:
                row = run_swarm(Path(tmp) / f"{attack}_{aggregation}", args, attack, aggregation)
                results.append(row)
                print(f"{attack:<11} {aggregation:<14} accuracy {100 * row['accuracy_mean']:5.1f}% "
                      f"(worst {100 * row['accuracy_min']:5.1f}%), global steps {row['global_steps']}, "
                      f"rounds {row['rounds_succeeded']}/{row['rounds']}, {row['wall_seconds']:.0f} s", flush=True)  # fmt: skip
    rounds = {r["aggregation"]: r["round_seconds_median"] for r in results if r["attack"] == "none"}
    compute = reduction_seconds()
    overhead = {
        "round_seconds_mean": rounds["mean"],
        "round_seconds_centered_clip": rounds["centered_clip"],
        "round_ratio": rounds["centered_clip"] / rounds["mean"] if rounds["mean"] and rounds["centered_clip"] else None,
        "reduction": compute,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    args.out.write_text(json.dumps({"args": settings, "results": results, "overhead": overhead}, indent=2))
    report(results, overhead, args.doc)


if __name__ == "__main__":
    main()
