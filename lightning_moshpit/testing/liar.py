"""A dishonest member for the private-swarm scenario: it holds the secret, trains nothing, and claims huge progress.

Every ``--period`` seconds it stores a progress record, signed and HMAC-tagged like an honest peer's, saying it has
``--samples`` samples toward the swarm's current global step (and ``--samples-per-second`` throughput). Without a
plausibility bound, hivemind's tracker adds that to the swarm's count and every peer takes an optimizer step at its
next refresh. Swarm settings come from the usual environment variables (``MOSHPIT_RUN_ID``, ``MOSHPIT_INITIAL_PEERS``,
``MOSHPIT_SWARM_SECRET``). It writes ``{"peer_id": ..., "records": ...}`` to ``--out`` when done.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Optional

from hivemind.optim.progress_tracker import LocalTrainingProgress
from hivemind.utils import ValueWithExpiration, get_dht_time

from lightning_moshpit import swarm
from lightning_moshpit.monitor import add_monitor_validators, progress_key
from lightning_moshpit.security import resolve_swarm_secret


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=60.0, help="lie at most this long")
    parser.add_argument("--samples", type=int, default=10**9, help="samples claimed toward the current step")
    parser.add_argument("--samples-per-second", type=float, default=100.0)
    parser.add_argument("--period", type=float, default=0.3, help="seconds between two records")
    args = parser.parse_args(argv)

    run_id = swarm.resolve_run_id(None)
    dht = swarm.start_dht(
        initial_peers=swarm.resolve_initial_peers(None),
        host_maddrs=swarm.resolve_host_maddrs(os.environ.get(swarm.ENV_HOST_MADDRS, "/ip4/127.0.0.1/tcp/0")),
        announce_maddrs=[],
        client_mode=False,
        identity_path=None,
        startup_timeout=30.0,
        swarm_secret=resolve_swarm_secret(None),
    )
    my_id = dht.peer_id.to_bytes()
    print(f"liar peer id {dht.peer_id.to_base58()}", flush=True)
    subkey = add_monitor_validators(dht, run_id).local_public_key
    records, deadline, last_seen = 0, time.monotonic() + args.seconds, time.monotonic()
    try:
        # lie until --seconds pass, or until the honest peers have been gone for a few seconds (their run ended)
        while time.monotonic() < deadline and not (records and time.monotonic() - last_seen > 5.0):
            found = dht.get(progress_key(run_id), latest=True)
            epochs = [
                item.value["epoch"]
                for item in (found.value.values() if found is not None and isinstance(found.value, dict) else [])
                if isinstance(item, ValueWithExpiration) and isinstance(item.value, dict)
                and item.value.get("peer_id") != my_id
            ]  # fmt: skip
            if epochs:
                last_seen = time.monotonic()
            if epochs:  # claim the samples toward the step the honest peers are gathering right now
                claim = LocalTrainingProgress(peer_id=my_id, epoch=max(epochs), samples_accumulated=args.samples,
                                              samples_per_second=args.samples_per_second, time=get_dht_time(),
                                              client_mode=False)  # fmt: skip
                dht.store(progress_key(run_id), subkey=subkey, value=claim.dict(),
                          expiration_time=get_dht_time() + 10.0)  # fmt: skip
                records += 1
            time.sleep(args.period)
    finally:
        args.out.write_text(json.dumps({"peer_id": dht.peer_id.to_base58(), "records": records}))
        dht.shutdown()
        dht.join(timeout=10)


if __name__ == "__main__":
    main()
