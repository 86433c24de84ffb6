"""Scenario 4: preemption. A peer is killed and restarted from its checkpoint while the swarm runs on; and the whole
swarm dies and restarts from checkpoints."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch

from lightning_moshpit.testing import scenarios

pytestmark = [pytest.mark.slow, pytest.mark.timeout(360)]


def saved_global_step(checkpoint: Path) -> int:
    """The swarm's global step stored in a Lightning checkpoint (hivemind keeps it in the optimizer state)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    return int(state["optimizer_states"][0]["state"]["local_epoch"])


def test_restarted_peer_rejoins_at_the_swarms_step_not_its_checkpoints(make_swarm, tmp_path, fault_free) -> None:
    swarm = make_swarm()
    progress, stop = tmp_path / "progress", tmp_path / "stop"
    checkpoints = [tmp_path / f"ckpt{i}" for i in range(3)]
    for index in range(3):
        extra = ["--progress-file", str(progress)] if index == 0 else []
        # peers 0 and 1 train until the restarted peer is done (``--stop-file``; 1000 local steps is a safety cap)
        swarm.start_peer([*scenarios.PEER_ARGS, "--min-peers", "3", "--seed", str(index), "--ckpt-dir",
                          str(checkpoints[index]), "--max-steps", "1000", "--stop-file", str(stop), *extra])  # fmt: skip
    swarm.wait_for_global_step(progress, 3, timeout=120)
    swarm.signal_peer(2, signal.SIGKILL)
    swarm.processes[2].wait(10)
    stale = saved_global_step(checkpoints[2] / "last.ckpt")
    restarted_at = swarm.wait_for_global_step(progress, stale + 3, timeout=120)
    swarm.start_peer([*scenarios.PEER_ARGS, "--seed", "2", "--ckpt-dir", str(checkpoints[2]),
                      "--resume", str(checkpoints[2] / "last.ckpt"), "--max-steps", "60"],
                     bootstrap=False)  # fmt: skip
    swarm.processes[3].wait(timeout=180)
    stop.touch()
    codes = swarm.wait(60)
    assert codes[:2] == [0, 0] and codes[3] == 0, [swarm.log(i)[-3000:] for i in (0, 1, 3)]
    reports = [scenarios.load_report(swarm.report_path(i)) for i in (0, 1, 3)]
    scenarios.figures("preempt (1 of 3 peers killed, restarted from its checkpoint)", reports, fault_free)

    rejoined = reports[2]["first_step_global"]
    print(f"checkpoint held global step {stale}; swarm at {restarted_at} on restart; the peer's first step ran at "
          f"global step {rejoined}")  # fmt: skip
    assert rejoined >= restarted_at > stale
    reference = reports[0] if str(rejoined) in reports[0]["snapshots"] else reports[1]
    difference = max(abs(a - b) for a, b in zip(reports[2]["first_step_params"], reference["snapshots"][str(rejoined)]))
    assert difference < 1e-4, "the restarted peer must take the swarm's parameters, not its checkpoint's"


def test_whole_swarm_restarts_from_checkpoints_at_the_last_saved_step(make_swarm, tmp_path) -> None:
    swarm = make_swarm()
    progress = tmp_path / "progress"
    checkpoints = [tmp_path / f"ckpt{i}" for i in range(2)]
    for index in range(2):
        extra = ["--progress-file", str(progress)] if index == 0 else []
        swarm.start_peer([*scenarios.PEER_ARGS, "--min-peers", "2", "--seed", str(index), "--ckpt-dir",
                          str(checkpoints[index]), "--max-steps", "150", *extra])  # fmt: skip
    swarm.wait_for_global_step(progress, 4, timeout=120)
    for index in range(2):
        swarm.signal_peer(index, signal.SIGKILL)
    for process in swarm.processes:
        process.wait(10)
    saved = [saved_global_step(path / "last.ckpt") for path in checkpoints]
    progress.unlink()
    for index in range(2):
        extra = ["--progress-file", str(progress)] if index == 0 else []
        swarm.start_peer([*scenarios.PEER_ARGS, "--min-peers", "2", "--seed", str(index), "--ckpt-dir",
                          str(checkpoints[index]), "--resume", str(checkpoints[index] / "last.ckpt"),
                          "--max-steps", "150", *extra], bootstrap=index == 0)  # fmt: skip
    codes = swarm.wait(240)
    assert codes[2:] == [0, 0], [swarm.log(i)[-3000:] for i in (2, 3)]
    reports = [scenarios.load_report(swarm.report_path(i)) for i in (2, 3)]
    scenarios.figures("whole swarm killed and restarted from checkpoints", reports)
    resumed = [report["first_step_global"] for report in reports]
    print(f"checkpoints held global steps {saved}; after the restart the peers' first steps ran at {resumed}")
    assert resumed == [max(saved)] * 2
    assert min(report["global_step"] for report in reports) > max(saved), "training must go on after the restart"
