"""Plot the loss histories that ``--progress.history_file`` wrote (one per peer) into one PNG.

    python recipes/swav/plot_loss.py loss0.json loss1.json --out docs/figures/swav_tiny_loss.png

Needs matplotlib (the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("histories", nargs="+", type=Path, help="JSON files written by --progress.history_file")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--title", default="SwAV tiny preset: training loss per global step")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    for index, path in enumerate(args.histories):
        history = json.loads(path.read_text())
        axis.plot(history["global_step"], history["loss"], label=f"peer {index}")
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
