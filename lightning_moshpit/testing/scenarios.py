"""Shared settings and figures for the fault-tolerance scenarios in ``tests/scenarios/``.

Every scenario runs real peers (:mod:`lightning_moshpit.testing.peer`) on 127.0.0.1 with the same settings, injects
one fault, and prints the same figures so runs can be compared with a fault-free swarm of the same length:

- averaging rounds attempted vs succeeded;
- the longest stall: the longest gap between two consecutive local steps of a peer, in seconds;
- local steps completed per peer;
- the final loss (mean over the last local steps) against the fault-free run's.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

#: Matchmaking and averaging timeouts of every scenario peer: a stall may not exceed their sum.
MATCHMAKING_TIME = 2.0
AVERAGING_TIMEOUT = 10.0
#: Samples per global step; with 16-sample batches, 3 peers make a global step every ~11 local steps.
TARGET_BATCH_SIZE = 512
#: Local steps per peer in a scenario run.
MAX_STEPS = 110

PEER_ARGS: list[str] = [
    "--batch-size", "16", "--compute-seconds", "0.05",
    "--matchmaking-time", str(MATCHMAKING_TIME), "--averaging-timeout", str(AVERAGING_TIMEOUT),
]  # fmt: skip
ENV = {"MOSHPIT_TARGET_BATCH_SIZE": str(TARGET_BATCH_SIZE)}


def load_report(path: Path) -> dict:
    return json.loads(path.read_text())


def longest_stall(report: dict) -> float:
    """Longest gap in seconds between consecutive local steps (an averaging round, a state download, a wait)."""
    times = report["step_times"]
    return max((b - a for a, b in zip(times, times[1:])), default=0.0)


def final_loss(report: dict, window: int = 10) -> float:
    losses = report["losses"][-window:]
    return sum(losses) / len(losses)


def initial_loss(report: dict, window: int = 10) -> float:
    losses = report["losses"][:window]
    return sum(losses) / len(losses)


def max_param_difference(reports: Sequence[dict], step: Optional[int] = None) -> tuple[int, float]:
    """(global step, max |difference|) between the peers' parameters at ``step`` (default: the last common one)."""
    common = set.intersection(*(set(report["snapshots"]) for report in reports))
    chosen = str(step) if step is not None else max(common, key=int)
    vectors = [report["snapshots"][chosen] for report in reports]
    return int(chosen), max(abs(a - b) for vector in vectors[1:] for a, b in zip(vectors[0], vector))


def all_finite(report: dict) -> bool:
    return all(math.isfinite(value) for value in report["final_params"])


@dataclasses.dataclass
class ScenarioFigures:
    """What every scenario prints and the closing note reports."""

    name: str
    rounds_attempted: int
    rounds_succeeded: int
    longest_stall: float
    steps_per_peer: list[int]
    final_loss: float
    fault_free_loss: Optional[float]
    fault_free_steps: Optional[int] = None

    def __str__(self) -> str:
        baseline = (
            f" (fault-free 3-peer run of {self.fault_free_steps} local steps: {self.fault_free_loss:.3f})"
            if self.fault_free_loss is not None
            else ""
        )
        return (
            f"[scenario {self.name}] rounds succeeded {self.rounds_succeeded}/{self.rounds_attempted}; longest stall "
            f"{self.longest_stall:.1f} s; local steps per peer {self.steps_per_peer}; final loss "
            f"{self.final_loss:.3f}{baseline}"
        )


def figures(name: str, reports: Sequence[dict], fault_free: Optional[Sequence[dict]] = None) -> ScenarioFigures:
    """Summarise the peers that finished (``reports``) and print the line."""
    rounds = [r for report in reports for r in report["rounds"]]
    result = ScenarioFigures(
        name=name,
        rounds_attempted=len(rounds),
        rounds_succeeded=sum(r["succeeded"] for r in rounds),
        longest_stall=max(longest_stall(report) for report in reports),
        steps_per_peer=[report["local_steps"] for report in reports],
        final_loss=sum(final_loss(report) for report in reports) / len(reports),
        fault_free_loss=sum(final_loss(r) for r in fault_free) / len(fault_free) if fault_free else None,
        fault_free_steps=fault_free[0]["local_steps"] if fault_free else None,
    )
    print(result)
    return result
