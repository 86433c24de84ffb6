"""Real swarms: 2 and 4 peer processes on 127.0.0.1 running Trainer.fit with strategy="moshpit".

Each peer is ``python -m lightning_moshpit.testing.peer`` (see that module) and writes a JSON report with every
averaging round it took part in, its parameters at each global step and the samples it contributed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_moshpit.testing.launch import LocalSwarm, partial_allreduce_lines

pytestmark = pytest.mark.slow

# A global step must last well beyond the progress tracker's refresh lag, or peers overshoot target_batch_size while
# they wait to see each other's samples; and matchmaking_time must exceed how far one peer can lag behind another on
# a loaded 2-core machine (up to ~1.5 s with 4 peers), or the laggard misses the group and averages alone.
PEER_ARGS = ["--batch-size", "16", "--compute-seconds", "0.05", "--matchmaking-time", "2.0",
             "--averaging-timeout", "15"]  # fmt: skip


def run_swarm(workdir: Path, run_id: str, num_peers: int, extra: list[str], timeout: float,
              target_batch_size: int) -> tuple[list[dict], str]:  # fmt: skip
    """Run ``num_peers`` peers to completion; returns their reports and their logs joined."""
    with LocalSwarm(workdir, run_id, env={"MOSHPIT_TARGET_BATCH_SIZE": str(target_batch_size)}) as swarm:
        for index in range(num_peers):
            swarm.start_peer([*PEER_ARGS, "--min-peers", str(num_peers), "--seed", str(index), *extra])
        codes = swarm.wait(timeout)
        logs = "\n".join(swarm.log(i) for i in range(num_peers))
        assert codes == [0] * num_peers, [swarm.log(i)[-3000:] for i in range(num_peers)]
    return [json.loads(swarm.report_path(i).read_text()) for i in range(num_peers)], logs


def run_and_check(workdir: Path, run_id: str, num_peers: int, extra: list[str], timeout: float,
                  target_batch_size: int) -> list[dict]:  # fmt: skip
    """Run a swarm once and check it, including that hivemind reported no partial all-reduce."""
    reports, logs = run_swarm(workdir, run_id, num_peers, extra, timeout, target_batch_size)
    assert not partial_allreduce_lines(logs), partial_allreduce_lines(logs)[:5]
    check_swarm_run(reports, num_peers, target_batch_size)
    return reports


def full_round_share(reports: list[dict], num_peers: int) -> tuple[int, int]:
    """(rounds that included every peer, all rounds) over the global steps every peer was still training for.

    The last global step is left out: a peer that finished its max_steps has left, so the others' final round
    legitimately has fewer members.
    """
    last_common = min(report["global_step"] for report in reports)
    rounds = [r for report in reports for r in report["rounds"] if r["epoch"] < last_common]
    return sum(r["group_size"] == num_peers for r in rounds), len(rounds)


def describe_rounds(reports: list[dict]) -> str:
    """Per peer: its group size at each global step, when it averaged (seconds after the first round), resyncs."""
    start = min(r["time"] for report in reports for r in report["rounds"])
    lines = []
    for index, report in enumerate(reports):
        rounds = " ".join(f"{r['epoch']}:{r['group_size']}@{r['time'] - start:.1f}s" for r in report["rounds"])
        lines.append(f"peer {index} (resyncs {report.get('resyncs')}, final step {report['global_step']}): {rounds}")
    return "\n".join(lines)


def max_param_difference_at_last_common_step(reports: list[dict]) -> tuple[int, float]:
    common = set.intersection(*(set(report["snapshots"]) for report in reports))
    step = max(common, key=int)
    vectors = [report["snapshots"][step] for report in reports]
    return int(step), max(abs(a - b) for vector in vectors[1:] for a, b in zip(vectors[0], vector))


def check_swarm_run(reports: list[dict], num_peers: int, target_batch_size: int) -> None:
    """Rounds with every peer >= 99%, equal parameters, and global steps within 1 of samples / target_batch_size.

    Runs are sized so samples / target_batch_size ends in about .9: a global step overshoots the target by a few
    percent (peers see each other's counts with a refresh lag), and the printed ratio shows by how much.
    """
    full, total = full_round_share(reports, num_peers)
    print(f"{num_peers} peers: {full}/{total} averaging rounds included every peer")
    assert total >= 4 * num_peers
    assert full / total >= 0.99, describe_rounds(reports)

    step, difference = max_param_difference_at_last_common_step(reports)
    print(f"{num_peers} peers: max |param difference| at global step {step}: {difference:.2e}")
    assert step >= 5 and difference < 1e-4

    samples = sum(report["samples"] for report in reports)
    expected_steps = samples / target_batch_size
    final_steps = [report["global_step"] for report in reports]
    print(
        f"{num_peers} peers: {samples} samples -> {expected_steps:.1f} expected global steps, got {final_steps} "
        f"({samples / max(final_steps) / target_batch_size:.2f} x target_batch_size per global step, remainder included)"
    )
    assert max(final_steps) >= expected_steps - 1 and max(final_steps) <= expected_steps + 1
    for report in reports:
        assert report["losses"][-1] < report["losses"][0]


@pytest.mark.timeout(600)
def test_two_peers_average_every_round_and_reach_the_same_parameters(tmp_path, run_id) -> None:
    # ~3 s of compute per global step: several times the tracker's refresh lag, so the sample count stays within 1
    run_and_check(tmp_path, run_id, 2, ["--max-steps", "349", "--compute-seconds", "0.1"], timeout=280,
                  target_batch_size=1024)  # fmt: skip


@pytest.mark.timeout(800)
def test_four_peers_average_every_round_and_reach_the_same_parameters(tmp_path, run_id) -> None:
    # 4 peers are 16+ processes on a 2-core machine: give each global step ~3 s of compute so rounds are booked from
    # the swarm's shared ETA rather than from each peer's (jittery) previous transition
    slower = ["--compute-seconds", "0.1", "--matchmaking-time", "3.0"]
    run_and_check(tmp_path, run_id, 4, ["--max-steps", "220", *slower], timeout=340, target_batch_size=2048)


@pytest.mark.timeout(600)
def test_accumulate_grad_batches_counts_samples_across_the_swarm(tmp_path, run_id) -> None:
    # each optimizer step reports 4 x 16 samples at once, so a global step overshoots the target by up to that much
    # per peer: keep it small relative to the target batch. Counting only 16 per step would give ~1.6 global steps.
    reports = run_and_check(tmp_path, run_id, 2, ["--max-steps", "110", "--accumulate", "4"], timeout=300,
                            target_batch_size=2048)  # fmt: skip
    for report in reports:
        assert report["local_steps"] == 110
        assert report["samples"] == 110 * 4 * 16


# The late joiner is covered, with its optimizer state, by tests/scenarios/test_join.py.
