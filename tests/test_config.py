"""Argument and environment handling of MoshpitStrategy: every bad input gets a clear error, nothing starts."""

from __future__ import annotations

import lightning as L
import pytest

import lightning_moshpit
from lightning_moshpit import MoshpitStrategy
from lightning_moshpit.averaging import COMPRESSION_NAMES, make_compression
from lightning_moshpit.swarm import check_platform

GOOD_MADDR = "/ip4/127.0.0.1/tcp/31337/p2p/12D3KooWKRyCQB49DDZ7aXiL7cN447m31SW3NTFbtgoxkAyZbPQZ"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ("MOSHPIT_INITIAL_PEERS", "MOSHPIT_RUN_ID", "MOSHPIT_TARGET_BATCH_SIZE", "MOSHPIT_HOST_MADDRS"):
        monkeypatch.delenv(name, raising=False)


def test_importing_registers_moshpit_and_moshpit_dpu() -> None:
    trainer = L.Trainer(strategy="moshpit", logger=False, enable_progress_bar=False)
    assert isinstance(trainer.strategy, MoshpitStrategy)
    assert not trainer.strategy.delay_parameter_updates
    dpu = L.Trainer(strategy="moshpit_dpu", logger=False, enable_progress_bar=False).strategy
    assert isinstance(dpu, MoshpitStrategy) and dpu.delay_parameter_updates
    assert lightning_moshpit.__version__


def test_documented_defaults() -> None:
    strategy = MoshpitStrategy()
    assert strategy.target_batch_size == 4096
    assert strategy.run_id == "moshpit"
    assert strategy.initial_peers == []
    assert strategy.host_maddrs == ["/ip4/0.0.0.0/tcp/0"]
    assert strategy.group_size == 16 and strategy.compression == "none"


def test_environment_configures_the_swarm(monkeypatch) -> None:
    monkeypatch.setenv("MOSHPIT_INITIAL_PEERS", f"{GOOD_MADDR}, {GOOD_MADDR.replace('31337', '31338')}")
    monkeypatch.setenv("MOSHPIT_RUN_ID", "env_run")
    monkeypatch.setenv("MOSHPIT_TARGET_BATCH_SIZE", "512")
    strategy = L.Trainer(strategy="moshpit", logger=False).strategy
    assert strategy.run_id == "env_run"
    assert strategy.target_batch_size == 512
    assert len(strategy.initial_peers) == 2


def test_arguments_override_environment(monkeypatch) -> None:
    monkeypatch.setenv("MOSHPIT_RUN_ID", "env_run")
    monkeypatch.setenv("MOSHPIT_TARGET_BATCH_SIZE", "512")
    strategy = MoshpitStrategy(run_id="arg_run", target_batch_size=64, initial_peers=[GOOD_MADDR])
    assert (strategy.run_id, strategy.target_batch_size, strategy.initial_peers) == ("arg_run", 64, [GOOD_MADDR])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(target_batch_size=0), "target_batch_size"),
        (dict(target_batch_size=-5), "target_batch_size"),
        (dict(target_batch_size=1.5), "target_batch_size"),
        (dict(initial_peers="/ip4/not-an-ip/tcp/1"), "initial_peers.*malformed"),
        (dict(initial_peers=["hello"]), "initial_peers.*malformed"),
        (dict(host_maddrs="/ip4/1.2.3.4/tcp/notaport"), "host_maddrs"),
        (dict(compression="zip"), "compression.*fp16"),
        (dict(group_size=3), "group_size.*power of two"),
        (dict(group_size=1), "group_size"),
        (dict(matchmaking_time=0), "matchmaking_time"),
        (dict(matchmaking_time=5.0, averaging_timeout=5.0), "averaging_timeout.*greater"),
        (dict(batch_size=0), "batch_size"),
        (dict(run_id="has space"), "run_id"),
        (dict(run_id=""), "run_id"),
        (dict(min_peers=0), "min_peers"),
        (dict(average_state_every=0), "average_state_every"),
        (dict(local_updates=True, delay_parameter_updates=True), "cannot be combined"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_argument(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        MoshpitStrategy(**kwargs)


def test_bad_environment_values_name_the_variable(monkeypatch) -> None:
    monkeypatch.setenv("MOSHPIT_TARGET_BATCH_SIZE", "lots")
    with pytest.raises(ValueError, match="MOSHPIT_TARGET_BATCH_SIZE"):
        MoshpitStrategy()
    monkeypatch.setenv("MOSHPIT_TARGET_BATCH_SIZE", "0")
    with pytest.raises(ValueError, match="MOSHPIT_TARGET_BATCH_SIZE"):
        MoshpitStrategy()
    monkeypatch.delenv("MOSHPIT_TARGET_BATCH_SIZE")
    monkeypatch.setenv("MOSHPIT_INITIAL_PEERS", "/dns/")
    with pytest.raises(ValueError, match="MOSHPIT_INITIAL_PEERS"):
        MoshpitStrategy()


def test_unknown_keyword_is_rejected_with_the_accepted_list() -> None:
    with pytest.raises(TypeError, match="target_batchsize.*accepts"):
        MoshpitStrategy(target_batchsize=4)
    with pytest.raises(TypeError, match="set through MoshpitStrategy"):
        MoshpitStrategy(use_local_updates=True)
    strategy = MoshpitStrategy(load_state_timeout=30.0)  # a real hivemind.Optimizer option passes through
    assert strategy.optimizer_kwargs == {"load_state_timeout": 30.0}


def test_non_linux_platform_is_refused() -> None:
    with pytest.raises(RuntimeError, match="Linux.*darwin"):
        check_platform("darwin")
    check_platform("linux")


@pytest.mark.parametrize("name", COMPRESSION_NAMES)
def test_every_compression_name_builds_a_hivemind_compression(name) -> None:
    assert make_compression(name) is not None
