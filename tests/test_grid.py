"""The Moshpit grid: 8 real peers with group_size=2 reach the exact global mean in 3 rounds."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lightning_moshpit.averaging import grid_dimensions, grid_group_bits, key_length


def test_grid_keys_put_exactly_group_size_peers_in_each_bucket() -> None:
    for num_peers, group_size in [(8, 2), (16, 4), (64, 4), (4, 2)]:
        keys = [grid_group_bits(i, num_peers, group_size) for i in range(num_peers)]
        assert {keys.count(key) for key in keys} == {group_size}
        assert len(keys[0]) == key_length(num_peers, group_size)


def test_small_swarm_averages_as_one_group() -> None:
    assert key_length(4, 16) == 0 and grid_group_bits(3, 4, 16) == ""
    assert grid_dimensions(17, 16) == 2


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_eight_peers_with_group_size_two_reach_exact_mean_in_three_rounds(tmp_path, run_id) -> None:
    num_peers = 8
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "lightning_moshpit.testing.grid_peer",
                "--rank",
                str(rank),
                "--num-peers",
                str(num_peers),
                "--group-size",
                "2",
                "--rounds",
                "3",
                "--run-id",
                run_id,
                "--workdir",
                str(tmp_path),
            ],
            stdout=open(tmp_path / f"grid{rank}.log", "wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        for rank in range(num_peers)
    ]
    try:
        codes = [process.wait(timeout=200) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    logs = {rank: (tmp_path / f"grid{rank}.log").read_text()[-2000:] for rank in range(num_peers)}
    assert codes == [0] * num_peers, logs

    expected_mean = sum(range(num_peers)) / num_peers
    reports = [json.loads((tmp_path / f"grid{rank}.json").read_text()) for rank in range(num_peers)]
    for report in reports:
        assert [r["group_size"] for r in report["rounds"]] == [2, 2, 2], report
        assert report["rounds"][-1]["value"] == pytest.approx(expected_mean, abs=1e-6), report
        assert report["rounds"][-1]["spread"] == 0.0, report
        # after only two rounds the peer holds the mean of a 4-peer slice, not the global mean
        assert report["rounds"][1]["value"] != pytest.approx(expected_mean, abs=1e-6), report
