"""ResIST in a real swarm: two peer processes on 127.0.0.1 train random sub-ResNets and end in agreement."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_moshpit.testing.launch import LocalSwarm

pytestmark = pytest.mark.slow

PEER = "lightning_moshpit.testing.resist_peer"


@pytest.mark.timeout(120)
def test_two_peers_with_resist_finish_with_parameters_in_agreement(tmp_path: Path, run_id: str) -> None:
    local_steps, max_steps = 5, 20
    args = ["--method", "resist", "--min-peers", "2", "--local-steps", str(local_steps), "--max-steps",
            str(max_steps), "--matchmaking-time", "1.0", "--averaging-timeout", "10"]  # fmt: skip
    with LocalSwarm(tmp_path, run_id) as swarm:
        for index in range(2):
            swarm.start_peer([*args, "--data-seed", str(index)], module=PEER)
        codes = swarm.wait(timeout=100)
        assert codes == [0, 0], [swarm.log(i)[-3000:] for i in range(2)]
        reports = [json.loads(swarm.report_path(i).read_text()) for i in range(2)]
        assert not swarm.leftover_processes()

    for report in reports:
        assert report["num_subnets"] == 2  # S defaults to the swarm size
        rounds = report["rounds"]
        assert [r["round"] for r in rounds] == [0, 1, 2, 3, -1]  # a round every local_steps batches, then the final
        assert rounds[-1]["group_size"] == 2, rounds  # the final round gathers both peers
    # the two peers spread over the two sub-networks in every round
    assert all(a["subnet"] != b["subnet"] for a, b in zip(reports[0]["rounds"], reports[1]["rounds"]))

    first, second = (report["final_tensors"] for report in reports)
    assert first.keys() == second.keys()
    worst = max(max(abs(x - y) for x, y in zip(first[name], second[name])) for name in first)
    assert worst < 1e-5, f"parameters disagree by {worst}"

    # each peer sent only what it held: a regular round costs well under what averaging the whole model costs
    # (2 peers: each sends half the model to the other and receives half of it back reduced: 4 bytes x numel)
    numel = sum(len(values) for values in first.values())
    full_round_bytes = 4 * numel
    # (one peer's share varies with where its blocks fall in the butterfly split; the mean over peers does not: with
    # S=2 a peer holds the shared 23% plus half of the 77% in the third stage, about 0.62 of the model)
    regular = [r["bytes_sent"] for report in reports for r in report["rounds"][:-1] if r["group_size"] == 2]
    assert regular, [report["rounds"] for report in reports]
    assert sum(regular) / len(regular) < 0.75 * full_round_bytes, (regular, full_round_bytes)


@pytest.mark.timeout(90)
def test_holder_averager_over_the_network_matches_the_specification_on_hand_made_tensors() -> None:
    """Three real averagers (one DHT and p2pd each): means over holders only, placeholders elsewhere, no-holder kept."""
    import threading

    import hivemind
    import torch

    from lightning_moshpit.holder_averaging import HolderAverager, HolderMasks, holder_weighted_average

    generator = torch.Generator().manual_seed(0)
    # tensor 1 is split into several hivemind parts (part_size_bytes below); tensor 3 is held by nobody
    values = [[torch.randn(5, generator=generator), torch.randn(3000, generator=generator),
               torch.randn(2, 2, generator=generator), torch.randn(4, generator=generator)] for _ in range(3)]  # fmt: skip
    masks = [
        HolderMasks(frozenset({0, 1}), frozenset({0, 1, 2, 3})),
        HolderMasks(frozenset({0, 2}), frozenset({0, 1})),
        HolderMasks(frozenset({0, 1}), frozenset({0, 2})),
    ]
    dhts = [hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])]
    dhts += [hivemind.DHT(start=True, initial_peers=dhts[0].get_visible_maddrs(), host_maddrs=["/ip4/127.0.0.1/tcp/0"])
             for _ in range(2)]  # fmt: skip
    averagers = [
        HolderAverager([v.clone() for v in values[i]], dhts[i], prefix="holders", start=True, target_group_size=4,
                       min_matchmaking_time=1.0, request_timeout=0.4, part_size_bytes=4000)  # fmt: skip
        for i in range(3)
    ]
    try:
        groups = [0, 0, 0]

        def average(i: int) -> None:
            groups[i] = averagers[i].average(masks[i], timeout=20)

        threads = [threading.Thread(target=average, args=(i,)) for i in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=40)
        assert groups == [3, 3, 3]
        expected = holder_weighted_average(values, masks)
        for i, averager in enumerate(averagers):
            with averager.get_tensors() as tensors:
                for got, want in zip(tensors, expected[i]):
                    torch.testing.assert_close(got, want)
        # a member that holds less sends less: member 1 holds 9 of the 3,013 numbers
        assert averagers[1].bytes_sent < 0.5 * averagers[0].bytes_sent
    finally:
        for averager in averagers:
            averager.shutdown()
        for dht in dhts:
            dht.shutdown()
