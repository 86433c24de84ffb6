"""CenteredClip on the attack benchmark's task without a swarm: one process, exact rounds, many seeds in seconds.

The real benchmark (``benchmarks/attacks.py``) runs 4 peer processes through hivemind and takes a minute per run on
2 cores, with run-to-run noise from timing (failed rounds, groups of 3). This script isolates the *aggregation rule*:
every step, 4 simulated peers each compute the gradient of a 64-64-10 MLP on 128 random digits samples (the last peer
attacks), the flat vector is cut into 4 pieces as hivemind's butterfly does, each piece is reduced by the mean or by
:func:`lightning_moshpit.clipping.centered_clip`, and SGD (momentum 0.9) applies the result; 25 steps as in the
benchmark. It is a model of the swarm, not a measurement of it: no failed rounds, no state averaging, one shared
model.

    python benchmarks/clip_simulation.py attacks --lr 0.2 --drop-factor 4   # accuracy per attack, 5 seeds
    python benchmarks/clip_simulation.py attacks --lr 0.2 --drop-factor 0   # clip only (no rejection)
    python benchmarks/clip_simulation.py ratios --lr 0.2    # how far honest parts lie from the result, in radii τ
"""

from __future__ import annotations

import argparse
import statistics
from typing import Optional

import torch
from torch import nn

from lightning_moshpit.clipping import centered_clip
from lightning_moshpit.testing.peer import make_digits


def run(lr: float, aggregation: str, attack: str, seed: int, drop_factor: Optional[float], steps: int = 25,
        ratios: Optional[list[float]] = None) -> float:  # fmt: skip
    """Train for ``steps`` steps; return the held-out accuracy. ``ratios`` collects the farthest honest part / τ."""
    train, test = make_digits()
    inputs, labels = train.tensors
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    params = list(net.parameters())
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        grads = []
        for peer in range(4):
            index = torch.randint(0, len(inputs), (128,), generator=generator)
            target = 9 - labels[index] if attack == "label_flip" and peer == 3 else labels[index]
            net.zero_grad()
            nn.functional.cross_entropy(net(inputs[index]), target).backward()
            flat = torch.cat([p.grad.flatten() for p in params])
            if peer == 3 and attack == "sign_flip":
                flat = -1000 * flat
            elif peer == 3 and attack == "gaussian":
                noise = torch.randn(flat.shape, generator=generator)
                flat = noise * 1000 * flat.norm() / noise.norm()
            grads.append(flat)
        stacked = torch.stack(grads)
        if aggregation == "mean":
            update = stacked.mean(0)
        else:
            pieces = []
            for piece in stacked.chunk(4, dim=1):
                result = centered_clip(piece, drop_factor=drop_factor)
                if ratios is not None and result.tau > 0:
                    honest = range(3) if attack != "none" else range(4)
                    ratios.append(max(result.distances[i] for i in honest) / result.tau)
                pieces.append(result.value)
            update = torch.cat(pieces)
        offset = 0
        for p in params:
            p.grad = update[offset:offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        optimizer.step()
    with torch.no_grad():
        return float((net(test.tensors[0]).argmax(1) == test.tensors[1]).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["attacks", "ratios"])
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--drop-factor", type=float, default=4.0, help="0: clip only")
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    drop = args.drop_factor or None
    if args.mode == "ratios":
        for attack in ("none", "sign_flip", "label_flip"):
            ratios: list[float] = []
            run(args.lr, "centered_clip", attack, 0, drop, ratios=ratios)
            ratios.sort()
            print(f"{attack:<10} farthest honest part / τ: median {ratios[len(ratios) // 2]:.2f}, "
                  f"p95 {ratios[int(0.95 * len(ratios))]:.2f}, max {ratios[-1]:.2f}")  # fmt: skip
        return
    for aggregation in ("mean", "centered_clip"):
        for attack in ("none", "sign_flip", "gaussian", "label_flip"):
            if aggregation == "mean" and attack != "none":
                continue
            accuracies = [run(args.lr, aggregation, attack, seed, drop) for seed in range(args.seeds)]
            print(f"{aggregation:<14} {attack:<10} accuracy {100 * statistics.fmean(accuracies):.1f} ± "
                  f"{100 * statistics.stdev(accuracies):.1f} % over {args.seeds} seeds", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
