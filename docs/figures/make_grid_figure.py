"""Draw which peers average together in each Moshpit round: 8 peers on a 2x2x2 grid, group_size M = 2.

Run from the repository root (needs matplotlib):

    python docs/figures/make_grid_figure.py

It writes ``docs/figures/moshpit_grid.png`` next to this script. The starting group keys come from
``lightning_moshpit.averaging.grid_group_bits``; the keys of later rounds are simulated the way hivemind's
``GroupKeyManager.update_key_on_group_assembled`` updates them: after a round, the members of a group get distinct
indices in ``range(M)`` (drawn by an RNG seeded per group), each appends its index as ``log2(M)`` bits to its key and
drops as many bits from the left. The script also checks that every peer holds the exact global average after
d = 3 rounds.
"""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lightning_moshpit.averaging import bits_per_dimension, grid_group_bits  # noqa: E402

NUM_PEERS = 8
GROUP_SIZE = 2
ROUNDS = 3
COLORS = ["#d62728", "#1f77b4", "#2ca02c", "#ff7f0e"]
OUTPUT = Path(__file__).with_name("moshpit_grid.png")
LAYER_GAP = 4.2  # horizontal offset of the c2 = 1 layer


def coordinates(index: int) -> tuple[int, int, int]:
    """Grid coordinates (c0, c1, c2) of a peer: its index written in base M."""
    return tuple((index // GROUP_SIZE**dim) % GROUP_SIZE for dim in range(3))  # type: ignore[return-value]


def position(index: int) -> tuple[float, float]:
    """Where a peer is drawn: the grid unfolded into two 2x2 layers, c2 = 0 on the left and c2 = 1 on the right."""
    c0, c1, c2 = coordinates(index)
    return 1.8 * c0 + LAYER_GAP * c2, 1.8 * c1


def simulate(seed: int = 0) -> list[tuple[dict[int, str], list[list[int]]]]:
    """For each round: the key every peer declares and the groups that form (peers sharing a key)."""
    rng = random.Random(seed)
    nbits = bits_per_dimension(GROUP_SIZE)
    keys = {peer: grid_group_bits(peer, NUM_PEERS, GROUP_SIZE) for peer in range(NUM_PEERS)}
    values = {peer: [1.0 if other == peer else 0.0 for other in range(NUM_PEERS)] for peer in range(NUM_PEERS)}
    history = []
    for _ in range(ROUNDS):
        buckets: dict[str, list[int]] = defaultdict(list)
        for peer, key in keys.items():
            buckets[key].append(peer)
        groups = [sorted(members) for _, members in sorted(buckets.items())]
        history.append((dict(keys), groups))
        for group in groups:
            mean = [sum(values[peer][k] for peer in group) / len(group) for k in range(NUM_PEERS)]
            new_indices = rng.sample(range(GROUP_SIZE), len(group))  # distinct index per member, as hivemind does
            for peer, new_index in zip(group, new_indices):
                values[peer] = list(mean)
                key = keys[peer]
                keys[peer] = (key + format(new_index, f"0{nbits}b"))[-len(key):] if key else ""
    for peer in range(NUM_PEERS):  # N = M^d peers: exact global average after d rounds
        assert all(abs(v - 1.0 / NUM_PEERS) < 1e-12 for v in values[peer]), (peer, values[peer])
    return history


def draw_grid(ax: plt.Axes) -> None:
    for a in range(NUM_PEERS):
        for b in range(a + 1, NUM_PEERS):
            (a0, a1, a2), (b0, b1, b2) = coordinates(a), coordinates(b)
            if a2 == b2 and abs(a0 - b0) + abs(a1 - b1) == 1:  # grid edges inside one layer
                (xa, ya), (xb, yb) = position(a), position(b)
                ax.plot([xa, xb], [ya, yb], color="#cccccc", lw=1, ls="--", zorder=1)


def main() -> None:
    history = simulate()
    fig, axes = plt.subplots(ROUNDS, 1, figsize=(9.5, 11))
    subtitles = [
        "partners differ only in c0 (starting key = c1 c2)",
        "one member of each round-1 group meets one of another (key = c2 + 1 fresh bit)",
        "across the two layers (key = 2 fresh bits): everyone now holds the global average",
    ]
    for round_index, (ax, (keys, groups)) in enumerate(zip(axes, history)):
        draw_grid(ax)
        for color, group in zip(COLORS, groups):
            xs, ys = zip(*(position(peer) for peer in group))
            ax.plot(xs, ys, color=color, lw=5, alpha=0.75, solid_capstyle="round", zorder=2)
        for color, group in zip(COLORS, groups):
            for peer in group:
                x, y = position(peer)
                ax.scatter([x], [y], s=800, color="white", edgecolor=color, linewidth=3, zorder=3)
                ax.text(x, y, str(peer), ha="center", va="center", fontsize=14, fontweight="bold", zorder=4)
                ax.text(x, y - 0.36, f"key '{keys[peer]}'", ha="center", va="top", fontsize=10, color=color,
                        bbox=dict(facecolor="white", edgecolor="none", pad=0.5), zorder=4)
        for layer in range(2):
            ax.text(0.9 + LAYER_GAP * layer, 2.45, f"layer c2 = {layer}", ha="center", fontsize=10, color="#555555")
        ax.set_title(f"Round {round_index + 1}: {subtitles[round_index]}", fontsize=11)
        ax.set_xlim(-0.8, 6.6)
        ax.set_ylim(-0.9, 2.75)
        ax.set_aspect("equal")
        ax.axis("off")
    axes[0].annotate("", xy=(1.4, -0.8), xytext=(0.4, -0.8), arrowprops=dict(arrowstyle="->", color="#555555"))
    axes[0].text(1.5, -0.8, "c0", va="center", fontsize=10, color="#555555")
    axes[0].annotate("", xy=(-0.6, 1.4), xytext=(-0.6, 0.4), arrowprops=dict(arrowstyle="->", color="#555555"))
    axes[0].text(-0.6, 1.5, "c1", ha="center", fontsize=10, color="#555555")
    fig.suptitle(
        "Moshpit averaging: 8 peers on a 2x2x2 grid, group_size M = 2\n"
        "Peers that declare the same key average together;\nafter each round every key drops its leftmost bit and gains a fresh one (log2(M) = 1 bit).",
        fontsize=12,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(OUTPUT, dpi=110)
    print(f"wrote {OUTPUT}")
    for round_index, (_, groups) in enumerate(history):
        print(f"round {round_index + 1}: groups {groups}")


if __name__ == "__main__":
    main()
