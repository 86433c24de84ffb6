"""Can one Byzantine peer wreck a swarm? Final test accuracy under attack, with the mean and with CenteredClip.

Four real peers (``lightning_moshpit.testing.peer``) train a small MLP on scikit-learn's digits on 127.0.0.1; the last
one is Byzantine (``--attack``, see :mod:`lightning_moshpit.testing.attacks`; ``none``: four honest peers). Every
(attack, aggregation, seed) cell is one swarm run; every peer stops when the swarm reaches ``--global-steps`` and the
script records the honest peers' held-out accuracy then (mean over them, and the worst one). Aggregations:
``mean``, ``centered_clip`` (the default rule: clip, then reject members beyond ``clip_drop`` radii) and
``clip_only`` (``centered_clip`` with ``clip_drop=None``, the rule before rejection existed).

Runs are *appended* to ``--out`` (``docs/benchmarks/attacks.json``; a cell run again replaces the old one), so the
table can be built in several commands of a few minutes each, and every run must use the same training settings.
The table between the ``attack-table`` markers of ``docs/security.md`` is rewritten from the whole JSON after each
command (or only that, with ``--from-json``): per cell, the mean over seeds ± the sample standard deviation.

``--overhead`` also times the reduction's compute alone on one all-reduce piece (4 senders, 131,072 floats: hivemind's
largest part), mean against CenteredClip; the per-round overhead comes from the attack-free runs' round times (as the
training process sees it, waiting for the group included).

    python benchmarks/attacks.py --fresh --attacks none --seeds 0 1 2 --overhead   # 6 runs of ~1 min each on 2 cores
    python benchmarks/attacks.py --attacks sign_flip gaussian --aggregations centered_clip --seeds 0 1 2
    python benchmarks/attacks.py --from-json      # rewrite the table from the JSON, run nothing
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable, Optional

import torch

from lightning_moshpit.clipping import centered_clip
from lightning_moshpit.reducers import ClipConfig
from lightning_moshpit.testing.attacks import ATTACKS
from lightning_moshpit.testing.launch import LocalSwarm, stop_swarms_on_sigterm

TABLE_MARKERS = ("<!-- attack-table:start -->", "<!-- attack-table:end -->")
OVERHEAD_MARKERS = ("<!-- attack-overhead:start -->", "<!-- attack-overhead:end -->")
#: aggregation label -> peer arguments
AGGREGATIONS = {
    "mean": ["--aggregation", "mean"],
    "centered_clip": ["--aggregation", "centered_clip"],
    "clip_only": ["--aggregation", "centered_clip", "--clip-drop", "0"],
}
#: the settings every merged run must share (the rest of ``args`` only selects what to run)
TRAINING_SETTINGS = ("peers", "global_steps", "local_steps", "batch_size", "target_batch_size", "lr", "hidden",
                     "matchmaking_time", "averaging_timeout")  # fmt: skip


def run_swarm(workdir: Path, args: argparse.Namespace, attack: str, aggregation: str, seed: int) -> dict:
    """One swarm of ``args.peers`` peers, the last one running ``attack``; returns the honest peers' figures.

    Peer ``i`` of seed ``s`` gets ``--seed 100 * s + i`` (model init and data order)."""
    common = ["--task", "digits", "--hidden", str(args.hidden), "--lr", str(args.lr), "--batch-size",
              str(args.batch_size), "--max-steps", str(args.local_steps), "--max-global-steps", str(args.global_steps),
              "--min-peers", str(args.peers),
              "--matchmaking-time", str(args.matchmaking_time), "--averaging-timeout", str(args.averaging_timeout),
              *AGGREGATIONS[aggregation]]  # fmt: skip
    env = {"MOSHPIT_TARGET_BATCH_SIZE": str(args.target_batch_size)}
    started = time.monotonic()
    with LocalSwarm(workdir, f"attacks_{uuid.uuid4().hex[:8]}", env=env) as swarm:
        for index in range(args.peers):
            byzantine = attack != "none" and index == args.peers - 1
            swarm.start_peer([*common, "--seed", str(100 * seed + index), *(["--attack", attack] if byzantine else [])])
        codes = swarm.wait(args.run_timeout)
        honest = range(args.peers - 1) if attack != "none" else range(args.peers)
        if any(codes[i] != 0 for i in honest):
            raise RuntimeError("\n".join(swarm.log(i)[-2000:] for i in honest))
        reports = [json.loads(swarm.report_path(i).read_text()) for i in honest]
        logs = [swarm.log(i) for i in honest]
        warnings = sorted({line.split("WARNING", 1)[-1].strip()[:300] for text in logs for line in text.splitlines()
                           if "CenteredClip: peer" in line})  # fmt: skip
        flagged = sum("CenteredClip: peer" in text for text in logs)
        rejected = sum("left out of the average" in text for text in logs)
    accuracies = [r["test_accuracy"] for r in reports]
    round_seconds = [s for r in reports for s in r["round_seconds"]]
    return {
        "attack": attack,
        "aggregation": aggregation,
        "seed": seed,
        "accuracy_mean": statistics.fmean(accuracies),
        "accuracy_min": min(accuracies),
        "test_loss_mean": statistics.fmean(r["test_loss"] for r in reports),
        "global_steps": [r["global_step"] for r in reports],
        "rounds": sum(len(r["rounds"]) for r in reports),
        "rounds_succeeded": sum(x["succeeded"] for r in reports for x in r["rounds"]),
        "round_seconds_median": statistics.median(round_seconds) if round_seconds else None,
        "round_seconds": round_seconds,
        "honest_peers_that_logged_an_outlier": flagged,
        "honest_peers_that_rejected_or_dropped_a_part": rejected,
        "outlier_warnings": warnings,  # first warning per (reducing peer, sender, averager): which rounds, how far
        "attacker_exit_code": codes[-1] if attack != "none" else None,
        "wall_seconds": time.monotonic() - started,
    }


def reduction_seconds(repeats: int = 20, senders: int = 4, size: int = 2**17) -> dict[str, float]:
    """Compute time of one reducer piece: hivemind's weighted mean vs CenteredClip as the reducer runs it (adaptive τ,
    10 iterations, then rejecting the sign-flipped sender and up to 10 more iterations)."""
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
    config = ClipConfig()
    clip = timed(lambda: centered_clip(parts, weights=weights.tolist(), tau=config.tau, iterations=config.iterations,
                                       tolerance=config.tolerance, drop_factor=config.drop_factor))  # fmt: skip
    return {"mean_seconds": mean, "centered_clip_seconds": clip, "ratio": clip / mean}


def summarize(results: list[dict]) -> dict[tuple[str, str], dict]:
    """Per (attack, aggregation): mean over seeds of the honest peers' mean accuracy, its standard deviation, n."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in results:
        groups.setdefault((row["attack"], row["aggregation"]), []).append(row)
    summary = {}
    for key, rows in groups.items():
        values = [r["accuracy_mean"] for r in rows]
        summary[key] = {
            "mean": statistics.fmean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else float("nan"),
            "n": len(values),
            "worst": min(r["accuracy_min"] for r in rows),
            "seeds": sorted(r["seed"] for r in rows),
        }
    return summary


def table(results: list[dict]) -> str:
    """The markdown table for docs/security.md: accuracy % as mean ± sd over seeds (n runs), worst honest peer."""
    summary = summarize(results)
    aggregations = [a for a in AGGREGATIONS if any(key[1] == a for key in summary)]

    def cell(key: tuple[str, str]) -> str:
        if key not in summary:
            return "-"
        row = summary[key]
        spread = f" ± {100 * row['sd']:.1f}" if row["n"] > 1 else ""
        return f"{100 * row['mean']:.1f}{spread} (n={row['n']}, worst {100 * row['worst']:.1f})"

    def gap(attack: str, aggregation: str, reference: str) -> str:
        """Difference of the means over seeds, ± its standard error sqrt(sd1²/n1 + sd2²/n2)."""
        attacked, clean = summary.get((attack, aggregation)), summary.get(("none", reference))
        if attack == "none" or not attacked or not clean:
            return ""
        text = f"{100 * (attacked['mean'] - clean['mean']):+.1f}"
        if attacked["n"] > 1 and clean["n"] > 1:
            error = math.sqrt(attacked["sd"] ** 2 / attacked["n"] + clean["sd"] ** 2 / clean["n"])
            text += f" ± {100 * error:.1f}"
        return text

    clips = [a for a in aggregations if a != "mean"]
    references = [(a, a) for a in clips] + ([(a, "mean") for a in clips] if "mean" in aggregations else [])
    header = ["attack (1 of 4 peers)", *[f"{a}: accuracy %" for a in aggregations],
              *[f"{a} vs {r} without attack (points)" for a, r in references]]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    attacks = sorted({key[0] for key in summary}, key=lambda a: ATTACKS.index(a))
    for attack in attacks:
        cells = [attack, *[cell((attack, a)) for a in aggregations], *[gap(attack, a, r) for a, r in references]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def overhead_from(results: list[dict], compute: Optional[dict]) -> Optional[dict]:
    """Median seconds per gradient round in the attack-free runs, mean against centered_clip, and the compute."""
    rounds = {}
    for aggregation in ("mean", "centered_clip"):
        seconds = [s for r in results if r["attack"] == "none" and r["aggregation"] == aggregation
                   for s in r["round_seconds"]]  # fmt: skip
        rounds[aggregation] = statistics.median(seconds) if seconds else None
    if compute is None or not rounds["mean"] or not rounds["centered_clip"]:
        return None
    return {
        "round_seconds_mean": rounds["mean"],
        "round_seconds_centered_clip": rounds["centered_clip"],
        "round_ratio": rounds["centered_clip"] / rounds["mean"],
        "reduction": compute,
    }


def overhead_text(overhead: dict) -> str:
    """One sentence with CenteredClip's cost against the mean."""
    compute = overhead["reduction"]
    ratio = overhead["round_ratio"]
    return (
        f"CenteredClip overhead, measured in the attack-free runs of the table: a gradient-averaging round took a median "
        f"{overhead['round_seconds_centered_clip']:.3f} s with centered_clip against {overhead['round_seconds_mean']:.3f} s "
        f"with the mean (ratio {ratio:.2f}; as the training process sees it, waiting for the group included). The "
        f"reduction's compute alone, on one 131,072-float piece from 4 senders, one of them sign-flipped (clip, reject "
        f"it, clip again): {1e3 * compute['centered_clip_seconds']:.2f} ms against {1e3 * compute['mean_seconds']:.2f} ms "
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


def report(saved: dict, doc: Optional[Path]) -> None:
    """Print the table and the overhead, and write them into ``doc``."""
    text = table(saved["results"])
    print()
    print(text)
    overhead = overhead_from(saved["results"], saved.get("reduction"))
    if overhead is not None:
        print()
        print(overhead_text(overhead))
    if doc is not None:
        write_doc(doc, TABLE_MARKERS, text)
        if overhead is not None:
            write_doc(doc, OVERHEAD_MARKERS, overhead_text(overhead))


def load(path: Path, settings: dict, fresh: bool) -> dict:
    """The saved runs, refusing to mix training settings (a table must compare like with like)."""
    if fresh or not path.exists():
        return {"settings": settings, "results": []}
    saved = json.loads(path.read_text())
    if saved.get("settings") != settings:
        raise SystemExit(f"{path} holds runs with other training settings ({saved.get('settings')}); "
                         f"these are {settings}. Pass --fresh to start a new table, or the same settings.")  # fmt: skip
    return saved


def main() -> None:
    stop_swarms_on_sigterm()  # a killed run stops its peers too
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=ATTACKS,
                        help="'none' is the attack-free swarm")  # fmt: skip
    parser.add_argument("--aggregations", nargs="+", default=["mean", "centered_clip"], choices=list(AGGREGATIONS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--global-steps", type=int, default=25, help="every peer stops at this swarm global step")
    parser.add_argument("--local-steps", type=int, default=1000, help="... or after this many local steps")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--target-batch-size", type=int, default=512)
    parser.add_argument("--lr", type=float, default=0.2, help="SGD (momentum 0.9) learning rate")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--matchmaking-time", type=float, default=1.0)
    parser.add_argument("--averaging-timeout", type=float, default=10.0)
    parser.add_argument("--run-timeout", type=float, default=240.0)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/attacks.json"))
    parser.add_argument("--doc", type=Path, default=Path("docs/security.md"))
    parser.add_argument("--fresh", action="store_true", help="start a new JSON instead of adding to --out")
    parser.add_argument("--overhead", action="store_true", help="also time the reduction's compute")
    parser.add_argument("--from-json", action="store_true", help="only rewrite --doc from --out, run nothing")
    args = parser.parse_args()
    if args.from_json:
        report(json.loads(args.out.read_text()), args.doc)
        return

    settings = {name: getattr(args, name) for name in TRAINING_SETTINGS}
    saved = load(args.out, settings, args.fresh)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for attack in args.attacks:
            for aggregation in args.aggregations:
                for seed in args.seeds:
                    row = run_swarm(Path(tmp) / f"{attack}_{aggregation}_{seed}", args, attack, aggregation, seed)
                    saved["results"] = [r for r in saved["results"]
                                        if (r["attack"], r["aggregation"], r["seed"]) != (attack, aggregation, seed)]
                    saved["results"].append(row)
                    args.out.write_text(json.dumps(saved, indent=2))  # after every run: a killed command keeps them
                    print(f"{attack:<11} {aggregation:<14} seed {seed} accuracy {100 * row['accuracy_mean']:5.1f}% "
                          f"(worst {100 * row['accuracy_min']:5.1f}%), global steps {row['global_steps']}, "
                          f"rounds {row['rounds_succeeded']}/{row['rounds']}, {row['wall_seconds']:.0f} s", flush=True)  # fmt: skip
    if args.overhead:
        saved["reduction"] = reduction_seconds()
        args.out.write_text(json.dumps(saved, indent=2))
    report(saved, args.doc)


if __name__ == "__main__":
    main()
