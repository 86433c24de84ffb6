"""Plot the loss histories that ``--progress.history_path`` wrote (one JSON-lines file per peer) into one PNG.

    python recipes/swav/plot_loss.py loss0.jsonl loss1.jsonl --out docs/figures/swav_tiny_loss.png

Needs matplotlib (the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("histories", nargs="+", type=Path, help="JSON-lines files written by --progress.history_path")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--title", default="SwAV tiny preset: training loss per global step")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    for index, path in enumerate(args.histories):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        rows = [row for row in rows if row["batches"]]  # a global step this peer computed no batch in has no loss
        axis.plot([row["global_step"] for row in rows], [row["loss"] for row in rows], label=f"peer {index}")
    axis.set_xlabel("global step (swarm optimizer steps)")
    axis.set_ylabel("SwAV loss (mean over the peer's batches)")
    axis.set_title(args.title, fontsize=10)
    axis.legend()
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
