"""The Moshpit grid: 8 real peers with group_size=2 reach the exact global mean in 3 rounds."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest

from lightning_moshpit.averaging import grid_bucket, grid_dimensions, grid_group_bits, grid_sides, key_length, round_key
from lightning_moshpit.testing.launch import partial_allreduce_lines, start_module


def test_grid_keys_put_exactly_group_size_peers_in_each_bucket() -> None:
    for num_peers, group_size in [(8, 2), (16, 4), (64, 4), (4, 2)]:
        keys = [grid_group_bits(i, num_peers, group_size) for i in range(num_peers)]
        assert {keys.count(key) for key in keys} == {group_size}
        assert len(keys[0]) == key_length(num_peers, group_size)


def test_small_swarm_averages_as_one_group() -> None:
    assert key_length(4, 16) == 0 and grid_group_bits(3, 4, 16) == ""
    assert grid_dimensions(17, 16) == 2


def run_grid(workdir, run_id: str, num_peers: int) -> tuple[list[dict], str]:
    """Run the 8 grid peers once; returns their reports and their logs joined."""
    workdir.mkdir(parents=True)
    env = {**os.environ}
    env.pop("MOSHPIT_INITIAL_PEERS", None)
    processes = [
        start_module(
            "lightning_moshpit.testing.grid_peer",
            ["--rank", str(rank), "--num-peers", str(num_peers), "--group-size", "2", "--rounds", "3",
             "--run-id", run_id, "--workdir", str(workdir)],
            env, workdir / f"grid{rank}.log",
        )  # fmt: skip
        for rank in range(num_peers)
    ]
    try:
        codes = [process.wait(timeout=200) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
    logs = "\n".join((workdir / f"grid{rank}.log").read_text() for rank in range(num_peers))
    assert codes == [0] * num_peers, logs[-6000:]
    return [json.loads((workdir / f"grid{rank}.json").read_text()) for rank in range(num_peers)], logs


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_eight_peers_with_group_size_two_reach_exact_mean_in_three_rounds(tmp_path, run_id) -> None:
    num_peers, expected_mean = 8, sum(range(8)) / 8
    reports, logs = run_grid(tmp_path / "grid", run_id, num_peers)
    assert not partial_allreduce_lines(logs), partial_allreduce_lines(logs)[:5]
    for report in reports:
        assert [r["group_size"] for r in report["rounds"]] == [2, 2, 2], report
        assert report["rounds"][-1]["value"] == pytest.approx(expected_mean, abs=1e-6), report
        assert report["rounds"][-1]["spread"] == 0.0, report
        # after only two rounds the peer holds the mean of a 4-peer slice, not the global mean
        assert report["rounds"][1]["value"] != pytest.approx(expected_mean, abs=1e-6), report


@pytest.mark.parametrize("num_peers,group_size", [(4, 2), (8, 4), (8, 2), (16, 4), (12, 4), (9, 2), (5, 4), (3, 4)])
def test_grid_buckets_of_consecutive_rounds_reach_the_exact_mean(num_peers: int, group_size: int) -> None:
    """d rounds of grid_bucket groups (d = grid dimensions) average every peer's value into the exact mean when the
    grid has no empty cell; every bucket holds at most group_size peers, and the populations it reports are real."""
    sides = grid_sides(num_peers, group_size)
    assert len(sides) == grid_dimensions(num_peers, group_size) and max(sides) <= group_size
    values = [float(index) for index in range(num_peers)]
    for round_number in range(len(sides)):
        buckets: dict[str, list[int]] = {}
        for index in range(num_peers):
            bits, population = grid_bucket(index, num_peers, group_size, round_number)
            assert len(bits) == key_length(num_peers, group_size)
            buckets.setdefault(bits, []).append(index)
        for members in buckets.values():
            assert len(members) <= group_size
            for index in members:
                assert grid_bucket(index, num_peers, group_size, round_number)[1] == len(members)
            mean = sum(values[index] for index in members) / len(members)
            for index in members:
                values[index] = mean
    if math.prod(sides) == num_peers:
        assert values == pytest.approx([sum(range(num_peers)) / num_peers] * num_peers)


@pytest.mark.parametrize("num_peers,group_size", [(5, 4), (6, 4), (17, 16), (20, 16), (100, 16), (12, 4)])
def test_grids_with_empty_cells_leave_at_most_one_peer_without_a_partner(num_peers: int, group_size: int) -> None:
    """Base-M positions would leave 15 of 17 peers alone (M = 16) on every second step; the shrunk sides do not."""
    for round_number in range(grid_dimensions(num_peers, group_size)):
        populations = [grid_bucket(i, num_peers, group_size, round_number)[1] for i in range(num_peers)]
        assert populations.count(1) <= 1, (round_number, populations)


def test_grid_bucket_rejects_a_position_outside_the_swarm() -> None:
    with pytest.raises(ValueError, match="`index` must be in"):
        grid_bucket(4, 4, 2, 0)


def test_round_keys_of_consecutive_steps_never_match_on_a_grid() -> None:
    """A peer up to 3 steps behind never shares a key with a round of another step (4 peers, group_size 2: the
    bucket bits alone repeat from one step to the next)."""
    keys = {(step, round_key(grid_bucket(i, 4, 2, step)[0], step)) for step in range(8) for i in range(4)}
    for step, key in keys:
        others = {k for s, k in keys if 0 < abs(s - step) < 4}
        assert key not in others
    assert round_key("", 3) == ""  # one group off the grid
