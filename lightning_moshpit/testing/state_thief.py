"""A peer program for the private-swarm scenario: download an insider's training state directly, around the DHT.

An outsider cannot use the DHT of a private swarm (its requests are refused), but it may know a member's address
and peer id, and call that member's state averager over libp2p as ``load_state_from_peers`` does. This program tries
that twice, each time with a fresh libp2p identity, against the bootstrap peer given in ``MOSHPIT_INITIAL_PEERS``:

1. as a *member*: it proves ``MOSHPIT_SWARM_SECRET`` first, as our averagers do, and retries until the member serves
   its state (``--member-seconds``); this shows the download path works, so a refusal below means something;
2. as an *outsider*: it proves ``--wrong-secret`` instead and tries ``--outsider-attempts`` times.

It writes ``{"member_messages", "outsider_messages", "outsider_id", ...}`` to ``--out``: the number of state messages
each identity received (the outsider must get none), and the errors of outsider attempts nobody answered.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Optional

from hivemind.p2p import P2P, PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils import MSGPackSerializer

from lightning_moshpit import swarm
from lightning_moshpit.security import PrivateTrainingStateAverager, SwarmSecret, resolve_swarm_secret, wrap_gather


async def download(address: str, prefix: str, secret: SwarmSecret) -> tuple[str, int, int]:
    """Prove ``secret`` to the peer at ``address`` from a new identity, then download its state.

    Returns (this identity's peer id, the proof's reply code, state messages received)."""
    p2p = await P2P.create(initial_peers=[address], host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        target = PeerID.from_base58(address.rsplit("/p2p/", 1)[1])
        stub = PrivateTrainingStateAverager.get_stub(p2p, target, namespace=prefix)
        user_bytes = MSGPackSerializer.dumps(wrap_gather(secret, p2p.peer_id, None))
        proof = averaging_pb2.JoinRequest(gather=MSGPackSerializer.dumps([0.0, 0, user_bytes]))
        reply = await asyncio.wait_for(stub.rpc_prove_membership(proof), timeout=10)
        messages = 0
        stream = await asyncio.wait_for(stub.rpc_download_state(averaging_pb2.DownloadRequest()), timeout=10)
        async for _ in stream:
            messages += 1
        return p2p.peer_id.to_base58(), reply.code, messages
    finally:
        await p2p.shutdown()


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--wrong-secret", required=True, help="the secret the outsider proves")
    parser.add_argument("--member-seconds", type=float, default=30.0, help="retry the member's download this long")
    parser.add_argument("--outsider-attempts", type=int, default=3)
    args = parser.parse_args(argv)

    run_id = swarm.resolve_run_id(None)
    prefix = f"{run_id}_state_averager"  # SwarmOptimizer's state averager (aggregation="mean")
    address = swarm.resolve_initial_peers(None)[0]
    secret = resolve_swarm_secret(None)
    assert secret is not None, "set MOSHPIT_SWARM_SECRET to the swarm's secret"
    report: dict = {"member_messages": 0, "member_attempts": 0, "outsider_messages": 0, "outsider_codes": []}
    deadline = time.monotonic() + args.member_seconds
    while report["member_messages"] == 0 and time.monotonic() < deadline:
        report["member_attempts"] += 1
        try:  # the member's averager may not share its state yet (it starts with fit)
            _, _, report["member_messages"] = asyncio.run(download(address, prefix, secret))
        except Exception as error:
            print(f"member download failed: {error!r}", flush=True)
        if report["member_messages"] == 0:
            time.sleep(1.0)
    report["outsider_errors"] = []
    for _ in range(args.outsider_attempts):
        try:  # the insiders may have finished meanwhile; the test requires at least one answered attempt
            outsider_id, code, messages = asyncio.run(download(address, prefix, SwarmSecret(args.wrong_secret)))
        except Exception as error:
            report["outsider_errors"].append(repr(error))
            continue
        report["outsider_id"] = outsider_id
        report["outsider_codes"].append(code)
        report["outsider_messages"] += messages
    print(json.dumps(report), flush=True)
    args.out.write_text(json.dumps(report))


if __name__ == "__main__":
    main()
