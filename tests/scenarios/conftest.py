"""Fixtures for the fault-tolerance scenarios: a swarm launcher that proves nothing outlives the test, and a
fault-free run of the same length to compare against."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lightning_moshpit.testing import scenarios
from lightning_moshpit.testing.launch import LocalSwarm


@pytest.fixture
def make_swarm(tmp_path: Path, run_id: str) -> Iterator[Callable[..., LocalSwarm]]:
    """``make_swarm(name)`` gives a :class:`LocalSwarm` under ``tmp_path/name``; after the test, every process of every
    swarm must be gone (peers, averagers, DHT processes and p2pd daemons)."""
    swarms: list[LocalSwarm] = []

    def make(name: str = "swarm", run: str = run_id) -> LocalSwarm:
        swarm = LocalSwarm(tmp_path / name, run, env=scenarios.ENV)
        swarms.append(swarm)
        return swarm

    yield make
    leftovers = []
    for swarm in swarms:
        swarm.stop()
        leftovers += swarm.leftover_processes()
    assert not leftovers, f"processes left running after the scenario: {leftovers}"


@pytest.fixture(scope="session")
def fault_free(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Reports of 3 peers that run the scenario settings with no fault (run once per session)."""
    workdir = tmp_path_factory.mktemp("fault_free")
    with LocalSwarm(workdir, f"fault_free_{uuid.uuid4().hex[:8]}", env=scenarios.ENV) as swarm:
        for index in range(3):
            swarm.start_peer([*scenarios.PEER_ARGS, "--min-peers", "3", "--seed", str(index),
                              "--max-steps", str(scenarios.MAX_STEPS)])  # fmt: skip
        codes = swarm.wait(200)
        assert codes == [0, 0, 0], [swarm.log(i)[-2000:] for i in range(3)]
    reports = [scenarios.load_report(swarm.report_path(i)) for i in range(3)]
    scenarios.figures("fault-free (3 peers)", reports)
    return reports
