"""Averaging benchmark: one round of averaging a tensor across P loopback peers, ours vs gloo vs stock hivemind.

Every peer is its own process on 127.0.0.1 with ``torch.set_num_threads(1)``. One set of processes per peer count runs
every size and variant in turn, synchronised by a gloo barrier (the gloo process group doubles as the benchmark's
control channel; its traffic is a few bytes between rounds, never during a timed hivemind round):

- **gloo**: ``torch.distributed.all_reduce`` (sum, then divide by P): the bandwidth-optimal reference.
- **hivemind**: a stock ``hivemind.DecentralizedAverager`` with its defaults (no target group size, request_timeout
  3 s, no compression) except ``min_matchmaking_time``, set to ``--matchmaking-time`` like ours.
- **ours**: the averager our strategy builds: :func:`lightning_moshpit.averaging.averager_options` (group size, a
  request_timeout of 0.4 x matchmaking_time, the grid key from ``grid_group_bits``), the compression by name from
  :func:`~lightning_moshpit.averaging.make_compression`, and the strategy's ``next_chunk_timeout``. The group size is
  the smallest power of two >= P, so the whole swarm averages in one group, as gloo does.

A hivemind round is ``step(wait=False, require_trigger=True)``: matchmaking runs until the group is assembled
(stage ``AWAITING_TRIGGER``), then ``allow_allreduce()`` starts the all-reduce. For each round the script records,
across peers, *total* = last peer done - first peer started (matchmaking included; matchmaking lasts at least
``min_matchmaking_time`` by hivemind's design) and *all-reduce* = last peer done - last peer triggered (matchmaking
excluded). Each tensor is refilled with ``rank + 1`` before a round and checked against the mean after it. The first
round of every variant warms connections up and is not counted; the table shows the median of ``--repeats`` rounds.

    python benchmarks/averaging.py                    # 2 and 4 peers, 4/24/95 MiB: about 5-8 min on 2 cores
    python benchmarks/averaging.py --peers 2 4 8 --sizes-mib 4 16 48 95 --repeats 5     # the full grid
    python benchmarks/averaging.py --peers 4 --sizes-mib 95 --profile                   # py-spy on one peer

Wrap it in ``flock /tmp/swarm.lock`` on a machine shared with other multi-peer runs.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lightning_moshpit.testing.profiling import cpu_seconds_by_kind, leaf_shares, start_py_spy, stop_py_spy

#: (name, compression, part_size_mib or None for hivemind's default 0.5 MiB)
VARIANTS: list[tuple[str, str, float | None]] = [
    ("hivemind", "none", None),
    ("ours", "none", None),
    ("ours", "fp16", None),
]
#: Extra variant run at the largest size only: hivemind's transfer unit raised from 0.5 MiB to 4 MiB.
LARGE_PARTS = ("ours", "none", 4.0)
ELEMENT_BYTES = 4


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ----------------------------------------------------------------------------------------------------------- worker


def worker(args: argparse.Namespace) -> None:  # noqa: C901 - one linear script per peer
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    rank, world = args.rank, args.world
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=args.timeout),
    )  # fmt: skip
    records: list[dict[str, Any]] = []
    sizes = [int(mib * 2**20 / ELEMENT_BYTES) for mib in args.sizes_mib]

    for mib, numel in zip(args.sizes_mib, sizes):
        tensor = torch.empty(numel)
        for repeat in range(args.repeats + 1):
            tensor.fill_(rank + 1)
            dist.barrier()
            start = time.time()
            dist.all_reduce(tensor)
            tensor.div_(world)
            end = time.time()
            error = float((tensor - (world + 1) / 2).abs().max())
            records.append(dict(variant="gloo", compression="none", part_mib=None, mib=mib, repeat=repeat,
                                start=start, triggered=start, end=end, group=world, error=error))  # fmt: skip
        del tensor

    import hivemind
    from hivemind.averaging.control import AveragingStage

    from lightning_moshpit.averaging import averager_options, grid_group_bits, make_compression

    address = [None]
    dht = hivemind.DHT(host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True) if rank == 0 else None
    if rank == 0:
        address = [[str(a) for a in dht.get_visible_maddrs()]]
    dist.broadcast_object_list(address, src=0)
    if rank != 0:
        dht = hivemind.DHT(initial_peers=address[0], host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    group_size = 1 << max(1, (world - 1).bit_length())
    matchmaking = args.matchmaking_time
    averaging_timeout = args.averaging_timeout

    plan = [(variant, mib, numel, False) for mib, numel in zip(args.sizes_mib, sizes) for variant in VARIANTS]
    if args.large_parts:
        plan.append((LARGE_PARTS, args.sizes_mib[-1], sizes[-1], False))
    if args.profile:  # a separate pass, so the profiler's own CPU use does not touch the numbers in the table
        plan.append((VARIANTS[1], args.sizes_mib[-1], sizes[-1], True))
    profiler = None
    cpu: list[dict[str, Any]] = []
    for (name, compression, part_mib), mib, numel, profiled in plan:
        tensor = torch.full((numel,), float(rank + 1))
        prefix = f"{args.run_id}_{name}_{compression}_{part_mib}_{mib}_{profiled}".replace(".", "p")
        options: dict[str, Any] = dict(min_matchmaking_time=matchmaking)
        if name == "ours":
            options.update(averager_options(group_size, matchmaking, grid_group_bits(rank, world, group_size)))
            options.update(compression=make_compression(compression), state_compression=make_compression(compression))
            options.update(next_chunk_timeout=max(matchmaking, averaging_timeout / 3))
        elif compression != "none":
            options.update(compression=make_compression(compression))
        if part_mib is not None:
            options.update(part_size_bytes=int(part_mib * 2**20))
        averager = hivemind.DecentralizedAverager([tensor], dht, prefix=prefix, start=True, **options)
        cpu_before: dict[str, float] = {}
        for repeat in range(args.repeats + 1):
            with averager.get_tensors() as tensors:
                tensors[0].fill_(rank + 1)
            if profiled and repeat == 1:  # every peer takes part in this barrier; one peer runs py-spy
                if rank == min(1, world - 1):
                    profiler = start_py_spy(os.getpid(), args.workdir / "profile.txt", rate=100, subprocesses=True)
                time.sleep(1.5)  # let py-spy attach
            dist.barrier()
            if repeat == 1:
                cpu_before = cpu_seconds_by_kind(os.getpid())
            start = time.time()
            control = averager.step(wait=False, require_trigger=True, timeout=averaging_timeout)
            while control.stage == AveragingStage.LOOKING_FOR_GROUP or control.stage == AveragingStage.IDLE:
                if control.done():
                    break
                time.sleep(0.002)
            triggered = time.time()
            control.allow_allreduce()
            try:
                group = control.result(timeout=averaging_timeout)
            except Exception as error:  # a failed round is a result, not a crash of the benchmark
                group = None
                print(f"rank {rank} {prefix} round {repeat}: {error!r}", file=sys.stderr, flush=True)
            end = time.time()
            with averager.get_tensors() as tensors:
                error = float((tensors[0] - (world + 1) / 2).abs().max())
            records.append(dict(variant=name + (" (profiled)" if profiled else ""), compression=compression, part_mib=part_mib, mib=mib, repeat=repeat,
                                start=start, triggered=triggered, end=end, group=len(group) if group else 0,
                                error=error))  # fmt: skip
        cpu_after = cpu_seconds_by_kind(os.getpid())
        cpu.append(dict(variant=name + (" (profiled)" if profiled else ""), compression=compression, part_mib=part_mib,
                        mib=mib, rounds=args.repeats,
                        seconds=python_and_p2pd(cpu_after, cpu_before)))  # fmt: skip
        if profiler is not None:
            stop_py_spy(profiler)
            profiler = None
        dist.barrier()
        averager.shutdown()
        del tensor
    (args.workdir / f"rank{rank}.json").write_text(json.dumps(records))
    (args.workdir / f"rank{rank}_cpu.json").write_text(json.dumps(cpu))
    dist.barrier()
    dht.shutdown()
    dist.destroy_process_group()


def component_costs(mib: float, part_mib: float, compression: str) -> dict[str, float]:
    """CPU seconds one process spends per ``mib`` MiB on each stage hivemind applies to every part (no network).

    hivemind's all-reduce cuts the tensor into parts of ``part_size_bytes``; for every part a peer sends, it compresses
    and serializes the part into a protobuf message, and for every part it receives, it parses the message,
    deserializes it and adds it into its running average (then the averaged part goes back the same way). These are
    the Python-side costs; the p2pd daemon's copies over its Unix socket and loopback TCP come on top.
    """
    import torch
    from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
    from hivemind.proto import runtime_pb2

    from lightning_moshpit.averaging import make_compression

    torch.set_num_threads(1)
    codec = make_compression(compression)
    numel = int(mib * 2**20 / ELEMENT_BYTES)
    part = int(part_mib * 2**20 / ELEMENT_BYTES)
    tensor = torch.randn(numel)
    accumulator = torch.zeros(part)
    stages = collections.Counter()
    for offset in range(0, numel, part):
        chunk = tensor[offset : offset + part]
        t0 = time.perf_counter()
        message = serialize_torch_tensor(chunk, codec.compression_type)
        t1 = time.perf_counter()
        wire = message.SerializeToString()
        t2 = time.perf_counter()
        parsed = runtime_pb2.Tensor.FromString(wire)
        t3 = time.perf_counter()
        restored = deserialize_torch_tensor(parsed)
        t4 = time.perf_counter()
        accumulator[: restored.numel()].add_(restored, alpha=0.5)
        t5 = time.perf_counter()
        stages["compress"] += t1 - t0
        stages["protobuf serialize"] += t2 - t1
        stages["protobuf parse"] += t3 - t2
        stages["decompress"] += t4 - t3
        stages["reduce (add_)"] += t5 - t4
    return dict(stages)


# ----------------------------------------------------------------------------------------------------------- driver


def run_swarm(args: argparse.Namespace, peers: int, workdir: Path) -> tuple[list[Any], list[Any]]:
    port = free_port()
    run_id = f"avgbench_{os.getpid()}_{peers}"
    common = [sys.executable, str(Path(__file__).resolve()), "--worker", "--world", str(peers), "--port", str(port),
              "--workdir", str(workdir), "--run-id", run_id, "--repeats", str(args.repeats),
              "--matchmaking-time", str(args.matchmaking_time), "--averaging-timeout", str(args.averaging_timeout),
              "--timeout", str(args.timeout), "--sizes-mib", *map(str, args.sizes_mib)]  # fmt: skip
    if args.profile:
        common.append("--profile")
    if args.large_parts:
        common.append("--large-parts")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    logs = [open(workdir / f"rank{rank}.log", "w") for rank in range(peers)]
    procs = [subprocess.Popen([*common, "--rank", str(rank)], stdout=logs[rank], stderr=subprocess.STDOUT, env=env,
                              start_new_session=True) for rank in range(peers)]  # fmt: skip
    deadline = time.monotonic() + args.timeout
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # the peer and its p2pd / averager children, nothing else
                proc.wait()
        for log in logs:
            log.close()
    codes = [proc.returncode for proc in procs]
    if codes != [0] * peers:
        tail = "\n".join((workdir / f"rank{rank}.log").read_text()[-3000:] for rank in range(peers))
        raise RuntimeError(f"{peers}-peer run failed with exit codes {codes}:\n{tail}")
    return [json.loads((workdir / f"rank{rank}.json").read_text()) for rank in range(peers)], [
        json.loads((workdir / f"rank{rank}_cpu.json").read_text()) for rank in range(peers)
    ]


def summarize(per_rank: list[list[dict[str, Any]]], peers: int, repeats: int) -> list[dict[str, Any]]:
    """Combine the peers' records round by round: total = last end - first start, all-reduce = last end - last trigger."""
    rounds: dict[tuple, list[dict[str, Any]]] = collections.defaultdict(list)
    for records in per_rank:
        for record in records:
            rounds[(record["variant"], record["compression"], record["part_mib"], record["mib"], record["repeat"])].append(record)
    rows: dict[tuple, dict[str, Any]] = {}
    for (variant, compression, part_mib, mib, repeat), members in rounds.items():
        key = (variant, compression, part_mib, mib)
        row = rows.setdefault(key, dict(peers=peers, variant=variant, compression=compression, part_mib=part_mib,
                                        mib=mib, total=[], allreduce=[], full_groups=0, max_error=0.0, warmup=None))  # fmt: skip
        total = max(m["end"] for m in members) - min(m["start"] for m in members)
        allreduce = max(m["end"] for m in members) - max(m["triggered"] for m in members)
        if repeat == 0:
            row["warmup"] = total
            continue
        row["total"].append(total)
        row["allreduce"].append(allreduce)
        row["full_groups"] += all(m["group"] == peers for m in members)
        row["max_error"] = max(row["max_error"], max(m["error"] for m in members))
    result = []
    for row in rows.values():
        row["total_median"] = statistics.median(row["total"])
        row["allreduce_median"] = statistics.median(row["allreduce"])
        row["rounds"] = repeats
        result.append(row)
    return result


def python_and_p2pd(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    """CPU seconds between two :func:`cpu_seconds_by_kind` readings, as the table shows them: Python (every thread
    and hivemind child process) and the p2pd daemon."""
    spent = {kind: after.get(kind, 0.0) - before.get(kind, 0.0) for kind in after}
    return {"python": sum(v for k, v in spent.items() if k not in ("p2pd", "profiler")), "p2pd": spent.get("p2pd", 0.0)}


def label(row: dict[str, Any]) -> str:
    text = row["variant"] if row["variant"] == "gloo" else f"{row['variant']} {row['compression']}"
    return text + (f" parts {row['part_mib']:g} MiB" if row["part_mib"] else "")


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    peer_counts = sorted({row["peers"] for row in rows})
    fig, axes = plt.subplots(1, len(peer_counts), figsize=(6 * len(peer_counts), 4.2), squeeze=False)
    for axis, peers in zip(axes[0], peer_counts):
        series: dict[str, list[tuple[float, float, float]]] = collections.defaultdict(list)
        for row in rows:
            if row["peers"] == peers and not row["part_mib"] and "profiled" not in row["variant"]:
                series[label(row)].append((row["mib"], row["total_median"], row["allreduce_median"]))
        for name, points in sorted(series.items()):
            points.sort()
            xs = [p[0] for p in points]
            line = axis.plot(xs, [p[2] for p in points], marker="o", label=f"{name}: all-reduce")[0]
            if name != "gloo":
                axis.plot(xs, [p[1] for p in points], marker="x", linestyle="--", color=line.get_color(),
                          label=f"{name}: with matchmaking")  # fmt: skip
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("tensor size, MiB")
        axis.set_ylabel("seconds per round (median)")
        axis.set_title(f"{peers} peers on 127.0.0.1, 2 cores")
        axis.grid(True, alpha=0.3, which="both")
        axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--sizes-mib", type=float, nargs="+", default=[4, 24, 95])
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per variant (after one warm-up round)")
    parser.add_argument("--matchmaking-time", type=float, default=1.0)
    parser.add_argument("--averaging-timeout", type=float, default=60.0)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds before a whole peer-count run is killed")
    parser.add_argument("--large-parts", action="store_true", help="also run ours with 4 MiB parts at the largest size")
    parser.add_argument("--profile", action="store_true", help="one more pass of ours, none, largest size, most peers, with py-spy on one peer")
    parser.add_argument("--summarize-profile", type=Path, help="only print the summary of a saved py-spy raw profile")
    parser.add_argument("--components-only", action="store_true", help="only the in-process per-part CPU costs")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/averaging.json"))
    parser.add_argument("--plot", type=Path, default=Path("docs/benchmarks/averaging.png"))
    # worker-only arguments
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--run-id", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    if args.summarize_profile:
        for name, share in leaf_shares(args.summarize_profile, top=25):
            print(f"{100 * share:5.1f}%  {name}")
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    components = {}
    largest = max(args.sizes_mib)
    print(f"in-process CPU seconds per {largest:g} MiB and stage (one core, no network)")
    print("| compression | part MiB | " + " | ".join(["compress", "protobuf serialize", "protobuf parse", "decompress",
                                                    "reduce (add_)"]) + " | sum |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for compression, part_mib in [("none", 0.5), ("none", 4.0), ("fp16", 0.5)]:
        costs = component_costs(largest, part_mib, compression)
        components[f"{compression}, {part_mib:g} MiB parts"] = costs
        print(f"| {compression} | {part_mib:g} | " + " | ".join(f"{v:.3f}" for v in costs.values()) +
              f" | {sum(costs.values()):.3f} |", flush=True)  # fmt: skip
    if args.components_only:
        return
    started = time.perf_counter()
    load_before = os.getloadavg()
    rows: list[dict[str, Any]] = []
    profile: list[tuple[str, float]] = []
    cpu_rows: list[dict[str, Any]] = []
    for peers in args.peers:
        with tempfile.TemporaryDirectory(prefix=f"avgbench{peers}_") as tmp:
            workdir = Path(tmp)
            args.profile_this_run = args.profile and peers == max(args.peers)
            per_rank, cpu_per_rank = run_swarm(
                argparse.Namespace(**{**vars(args), "profile": args.profile_this_run}), peers, workdir
            )
            rows.extend(summarize(per_rank, peers, args.repeats))
            for entries in zip(*cpu_per_rank):  # the same config on every peer
                total: dict[str, float] = collections.Counter()
                for entry in entries:
                    total.update(entry["seconds"])
                cpu_rows.append(dict(peers=peers, **{k: v for k, v in entries[0].items() if k != "seconds"},
                                     cpu_seconds_per_round={k: v / entries[0]["rounds"] for k, v in total.items()}))  # fmt: skip
            if args.profile_this_run and (workdir / "profile.txt").exists():
                profile = leaf_shares(workdir / "profile.txt")
                (args.out.parent / "averaging_profile.txt").write_text((workdir / "profile.txt").read_text())
        print(f"{peers} peers done after {time.perf_counter() - started:.0f} s", flush=True)

    gloo = {(row["peers"], row["mib"]): row for row in rows if row["variant"] == "gloo"}
    order = {"gloo": 0, "hivemind": 1, "ours": 2, "ours (profiled)": 3}
    rows.sort(key=lambda r: (r["peers"], r["mib"], order[r["variant"]], r["compression"], r["part_mib"] or 0))
    print(f"\nmedian of {args.repeats} rounds; matchmaking_time {args.matchmaking_time} s; load before {load_before[0]:.2f}")
    print("| peers | MiB | variant | s/round incl. matchmaking | s/round all-reduce only | ratio to gloo (all-reduce) | "
          "rounds with all peers | max error |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        reference = gloo[(row["peers"], row["mib"])]["allreduce_median"]
        row["ratio_to_gloo"] = row["allreduce_median"] / reference
        row["ratio_to_gloo_with_matchmaking"] = row["total_median"] / reference
        incl = "–" if row["variant"] == "gloo" else f"{row['total_median']:.3f}"
        ratio = f"{row['ratio_to_gloo']:.1f}×" + ("" if row["variant"] == "gloo" else f" ({row['ratio_to_gloo_with_matchmaking']:.1f}×)")
        print(f"| {row['peers']} | {row['mib']:g} | {label(row)} | {incl} | {row['allreduce_median']:.3f} | {ratio} | "
              f"{row['full_groups']}/{row['rounds']} | {row['max_error']:.2g} |")  # fmt: skip
    print("\nCPU seconds per round, summed over all peers' processes (python: peer, averager, DHT; p2pd: the daemons)")
    print("| peers | MiB | variant | python | p2pd | wall s per round, incl. matchmaking | cores busy (approx.) |")
    print("|---|---|---|---|---|---|---|")
    walls = {(r["peers"], r["variant"], r["compression"], r["part_mib"], r["mib"]): r["total_median"] for r in rows}
    for row in cpu_rows:
        seconds = row["cpu_seconds_per_round"]
        wall = walls.get((row["peers"], row["variant"], row["compression"], row["part_mib"], row["mib"]), float("nan"))
        busy = (seconds.get("python", 0.0) + seconds.get("p2pd", 0.0)) / wall
        print(f"| {row['peers']} | {row['mib']:g} | {label(row)} | {seconds.get('python', 0.0):.2f} | "
              f"{seconds.get('p2pd', 0.0):.2f} | {wall:.2f} | {busy:.2f} |")  # fmt: skip
    if profile:
        print("\npy-spy, one peer (ours, no compression, largest size): share of samples by leaf function [process]")
        for name, share in profile:
            print(f"{100 * share:5.1f}%  {name}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(
        command="python benchmarks/averaging.py " + " ".join(sys.argv[1:]), matchmaking_time=args.matchmaking_time,
        repeats=args.repeats, load_average_before=load_before, rows=rows, profile_top_leaves=profile,
        component_seconds=components, cpu=cpu_rows,
    ), indent=1))  # fmt: skip
    plot(rows, args.plot)
    print(f"wrote {args.out} and {args.plot} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
