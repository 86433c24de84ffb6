"""Reading the per-global-step history that ``--progress.history_path`` writes (``SwarmProgress``), for recipe tests."""

from __future__ import annotations

import json
import math
from pathlib import Path

#: Share of a peer's global steps whose gradient round must have averaged both peers ("most rounds"). Under delayed
#: parameter updates (ALBERT) a round ends after its step did, so it is recorded one step late and step 0 never counts:
#: 9 of 10 is the most a 10-step ALBERT run shows. 0.7 leaves room for a peer that the loaded 2-core machine starves
#: for two steps (it loads the swarm's state and skips them, as in issue 16's ALBERT run), and still fails a run in
#: which only a third of the rounds averaged both peers (the bar before issue 16).
MOST_ROUNDS = 0.7


def read_history(path: Path, steps: int) -> list[dict]:
    """The records of one peer, checked to be exactly one per global step 0 .. ``steps - 1`` with finite losses.

    ``SwarmProgress`` writes a record for every global step, also for one a peer skipped by loading the swarm's state
    (``caught_up``, no batches): a missing step means the history, not the peer, is wrong.
    """
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [row["global_step"] for row in rows] == list(range(steps)), rows
    assert all(math.isfinite(row["loss"]) for row in rows if row["batches"]), rows
    return rows


def averaged_both_peers_in_most_rounds(rows: list[dict]) -> bool:
    """Whether at least :data:`MOST_ROUNDS` of the steps had a gradient round that averaged 2 peers."""
    return sum(row["group_size"] == 2 for row in rows) >= MOST_ROUNDS * len(rows)


def losses(rows: list[dict]) -> list[float]:
    """This peer's mean training loss at each step it computed batches in."""
    return [row["loss"] for row in rows if row["batches"]]
