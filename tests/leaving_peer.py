"""A stand-in peer for ``test_p2p_streams.py``: one averaging round, then leave at once.

Run as ``python -m leaving_peer ROLE WORKDIR DELAY``. ``reducer`` starts the DHT, averages one round with the
``reader`` and shuts down the moment its ``step`` returns. ``reader`` joins in client mode, so the reducer reduces
every part and the reader's result travels in a stream the reducer serves; it starts reading that stream only
``DELAY`` seconds after opening it, as a peer on a loaded machine may. Each writes ``ROLE.json``: its group size,
the smallest and largest value of its averaged tensor, and (reducer) how long its shutdown took.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator

import hivemind
import torch
from hivemind.p2p import P2P

from lightning_moshpit.averaging import averager_options
from lightning_moshpit.testing.launch import write_atomically

#: Large enough that the result does not fit in the sockets' buffers between the two daemons and the reader.
NUM_VALUES = 4_000_000

#: hivemind's default is 5 s, of which the averager drains its streams for at most half: more room on a loaded machine.
SHUTDOWN_TIMEOUT = 12.0


def read_results_late(delay: float) -> None:
    """Make this process start reading each ``rpc_aggregate_part`` response stream ``delay`` seconds late."""
    iterate = P2P._iterate_protobuf_stream_handler

    async def late(self: P2P, peer_id: Any, name: str, requests: Any, output_type: type) -> AsyncIterator[Any]:
        responses = await iterate(self, peer_id, name, requests, output_type)
        if not name.endswith(".rpc_aggregate_part"):
            return responses

        async def after_delay() -> AsyncIterator[Any]:
            await asyncio.sleep(delay)
            async for response in responses:
                yield response

        return after_delay()

    P2P._iterate_protobuf_stream_handler = late


def main(role: str, workdir: Path, delay: float) -> None:
    torch.set_num_threads(1)
    address_file, reader = workdir / "reducer.addr", role == "reader"
    if reader:
        read_results_late(delay)
        while not address_file.exists():
            time.sleep(0.05)
        dht = hivemind.DHT(initial_peers=address_file.read_text().split(","), host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                           client_mode=True, start=True)  # fmt: skip
    else:
        dht = hivemind.DHT(host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
        write_atomically(address_file, ",".join(str(a) for a in dht.get_visible_maddrs()))
    averager = hivemind.DecentralizedAverager(
        [torch.full((NUM_VALUES,), 1.0 if reader else 0.0)], dht, prefix=f"leaving_{workdir.name}", start=True,
        client_mode=reader, min_matchmaking_time=1.0, shutdown_timeout=SHUTDOWN_TIMEOUT, **averager_options(2, 1.0, ""),
    )  # fmt: skip
    group = averager.step(timeout=60)
    with averager.get_tensors() as tensors:
        low, high = float(tensors[0].min()), float(tensors[0].max())
    began = time.monotonic()
    averager.shutdown()
    dht.shutdown()
    report = {"group_size": len(group) if group else 0, "min": low, "max": high,
              "shutdown_seconds": time.monotonic() - began}  # fmt: skip
    write_atomically(workdir / f"{role}.json", json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), float(sys.argv[3]))
