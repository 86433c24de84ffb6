"""One peer of a pure averaging experiment on the Moshpit grid (no training).

Every peer holds a one-element tensor equal to its rank, takes a grid position from its rank, and runs ``--rounds``
averaging rounds with the same averager configuration MoshpitStrategy uses. With N = M^d peers and d rounds, every
peer must end with exactly the mean of all ranks. Peers find each other through the first peer's DHT address file.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import hivemind
import torch
from hivemind.utils import get_dht_time

from lightning_moshpit.averaging import averager_options, grid_group_bits
from lightning_moshpit.testing.launch import write_atomically


def wait_for(path: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout} s")
        time.sleep(0.1)
    return path.read_text()


def barrier(dht: hivemind.DHT, key: str, rank: int, num_peers: int, timeout: float) -> None:
    """Announce ``rank`` under ``key`` and wait until ``num_peers`` peers have."""
    dht.store(key, subkey=rank, value=True, expiration_time=get_dht_time() + 600)
    deadline = time.monotonic() + timeout
    while True:
        found = dht.get(key, latest=True)
        if found is not None and isinstance(found.value, dict) and len(found.value) >= num_peers:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(found.value) if found else 0} of {num_peers} peers reached {key!r}")
        time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--num-peers", type=int, required=True)
    parser.add_argument("--group-size", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--matchmaking-time", type=float, default=1.0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    address_file = args.workdir / "grid.addr"
    initial_peers = [] if args.rank == 0 else wait_for(address_file, 60).split(",")
    dht = hivemind.DHT(initial_peers=initial_peers, host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    if args.rank == 0:
        write_atomically(address_file, ",".join(str(a) for a in dht.get_visible_maddrs()))

    tensor = torch.full((4096,), float(args.rank))  # large enough that every group member reduces a part
    bits = grid_group_bits(args.rank, args.num_peers, args.group_size)
    averager = hivemind.DecentralizedAverager(
        [tensor], dht, prefix=f"{args.run_id}_grid", start=True, min_matchmaking_time=args.matchmaking_time,
        **averager_options(args.group_size, args.matchmaking_time, bits),
    )  # fmt: skip

    rounds = []
    for round_index in range(args.rounds):
        # rounds are synchronous, as in training where each global step is one round: a peer still in round r must
        # not meet a peer already in round r + 1 that happens to hold the same key
        barrier(dht, f"{args.run_id}_round{round_index}", args.rank, args.num_peers, timeout=120)
        key_before = averager.get_group_bits()
        group = averager.step(timeout=60)
        with averager.get_tensors() as tensors:
            value, spread = float(tensors[0].mean()), float(tensors[0].max() - tensors[0].min())
        rounds.append({"key": key_before, "group_size": len(group) if group else 0, "value": value, "spread": spread})
    (args.workdir / f"grid{args.rank}.json").write_text(json.dumps({"rank": args.rank, "bits": bits, "rounds": rounds}))
    averager.shutdown()
    dht.shutdown()


if __name__ == "__main__":
    main()
