"""CenteredClip: a robust average that one wild vector cannot drag far (the pure math, no networking).

The mean of ``n`` vectors moves by ``‖b‖ / n`` when one of them is replaced by an arbitrary vector ``b``: a single
peer that sends ``-1000 x`` its gradient, or NaN, decides the whole swarm's step. *CenteredClip* (Karimireddy et al.,
2021; used by BTARD, Gorbunov et al., ICML 2022) bounds that influence. Starting from a robust guess ``x`` it repeats

    x <- x + Σ_i w_i (g_i - x) min(1, τ / ‖g_i - x‖) / Σ_i w_i

Every vector pulls ``x`` towards itself, but never by more than the radius ``τ``: vectors within ``τ`` of ``x`` count
exactly as in the (weighted) mean, a vector far away counts as if it lay at distance ``τ``. The fixed point is
therefore close to the mean of the honest majority; an outlier can shift it by at most about ``τ · w_bad / Σ w``.

Choices made here (see docs/security.md for what they defend and what not):

- **Start** from the coordinate-wise median, which a minority cannot move outside the honest values' range. For an
  even count it is the midpoint of the two middle values, so for two vectors it is their mean.
- **Radius** ``tau``: a fixed number, or ``None`` for an *adaptive* radius, the median distance of the vectors to the
  starting point (the lower median for an even count). With fewer than half the vectors bad, that median is an honest
  vector's distance, so honest vectors are barely clipped whatever the gradients' scale, while far outliers are. A fixed ``τ`` must be tuned to the
  gradients' norm, which changes over training.
- **Non-finite vectors** (any NaN or ±inf) are *dropped*: they are outliers at infinite distance, and clipping cannot
  give them a finite direction. If every vector is non-finite the result is zeros (no update) rather than NaN.
- **Weights** (hivemind weighs a peer's gradient by the samples it reports) are capped at the median weight, so a
  peer cannot buy influence by claiming a huge sample count. Zero-weight vectors (a peer tagging along) are ignored.
- **Stop** after ``iterations`` steps or as soon as a step moves ``x`` by less than ``tolerance · τ``.
- **Drop far outliers** (``drop_factor``, BTARD-style): clipping alone still lets one bad vector of ``n`` pull the
  result by about ``τ / n`` every round, always the same way for a sign flip, which adds up over a run. After
  clipping, vectors farther than ``drop_factor · τ`` from the result are *rejected* (weight 0) and CenteredClip
  continues from there over the others, so a far outlier ends with no influence at all. Honest vectors lie about
  ``τ`` from the result (τ is their median distance), so a factor of a few keeps them; at most ``(k - 1) // 2`` of
  the ``k`` remaining vectors are rejected (the farthest), so the rule never removes a majority. ``None`` disables it
  (plain CenteredClip). Vectors between ``τ`` and ``drop_factor · τ`` are still clipped, as before.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Optional

import torch

#: Default number of CenteredClip iterations after the median start; each costs O(n · d) for n vectors of size d.
DEFAULT_CLIP_ITERS = 10
#: Stop early once one iteration moves the estimate by less than this fraction of the radius τ.
DEFAULT_TOLERANCE = 1e-6
#: Reject (weight 0) vectors farther than this many radii τ from the clipped result. In a single-process simulation of
#: the digits attack benchmark (4 peers of 128 samples, adaptive τ, 25 steps), the farthest honest part of a piece lay
#: a median 1.4 τ and at most 2.4 τ away, while the attacks' parts lie ~1000 τ away: 4 leaves honest parts a margin.
DEFAULT_DROP_FACTOR = 4.0


@dataclasses.dataclass(frozen=True)
class ClipResult:
    """The robust average and what it took to get there (the reducer logs it; tests inspect it)."""

    value: torch.Tensor  #: the aggregate, same shape and dtype as one input vector
    tau: float  #: the clipping radius actually used (the adaptive one when ``tau=None``)
    iterations: int  #: CenteredClip steps taken after the median start
    dropped: tuple[int, ...]  #: indices of inputs left out because they held NaN or inf
    clipped: tuple[int, ...]  #: indices of inputs farther than τ from the result: their pull was clipped
    distances: tuple[float, ...]  #: each input's distance to the result (inf for non-finite or zero-weight ones)
    rejected: tuple[int, ...] = ()  #: indices left out for lying farther than ``drop_factor · τ`` (weight 0)


def coordinate_median(vectors: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise median of the rows of ``vectors`` (n, d); for even n the midpoint of the two middle values."""
    ordered = vectors.sort(dim=0).values
    count = ordered.shape[0]
    return (ordered[(count - 1) // 2] + ordered[count // 2]) / 2


def centered_clip(
    vectors: Sequence[torch.Tensor] | torch.Tensor,
    weights: Optional[Sequence[float]] = None,
    tau: Optional[float] = None,
    iterations: int = DEFAULT_CLIP_ITERS,
    tolerance: float = DEFAULT_TOLERANCE,
    drop_factor: Optional[float] = None,
) -> ClipResult:
    """Robustly average same-shaped tensors with CenteredClip (see the module docstring for every choice).

    Args:
        vectors: the tensors to average (a sequence, or one tensor whose first dimension indexes them).
        weights: non-negative weight per tensor (default: all 1); capped at the median positive weight.
        tau: clipping radius; ``None`` picks the median distance of the inputs to their coordinate-wise median.
        iterations: at most this many CenteredClip steps after the median start (0 returns the median).
        tolerance: stop when a step moves the estimate by less than ``tolerance * tau``.
        drop_factor: after clipping, reject inputs farther than ``drop_factor * tau`` from the result (at most a
            minority, farthest first) and clip again without them; ``None`` keeps every finite input (plain
            CenteredClip). Must be > 1.
    """
    stacked = torch.stack(list(vectors)) if not isinstance(vectors, torch.Tensor) else vectors
    if stacked.dim() == 0 or stacked.shape[0] == 0:
        raise ValueError("centered_clip needs at least one vector")
    if tau is not None and not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"`tau` must be a positive finite number or None (adaptive), got {tau!r}")
    if drop_factor is not None and not (math.isfinite(drop_factor) and drop_factor > 1):
        raise ValueError(f"`drop_factor` must be a finite number > 1 (a multiple of the radius) or None, got {drop_factor!r}")
    shape, dtype, count = stacked.shape[1:], stacked.dtype, stacked.shape[0]
    rows = stacked.reshape(count, -1).to(torch.float32 if not stacked.is_floating_point() else dtype)
    if rows.dtype in (torch.float16, torch.bfloat16):
        rows = rows.float()  # sums of squares overflow in half precision
    raw_weights = torch.ones(count, dtype=torch.float64) if weights is None else torch.tensor(weights, dtype=torch.float64)
    if raw_weights.shape != (count,) or not bool(torch.isfinite(raw_weights).all()) or bool((raw_weights < 0).any()):
        raise ValueError(f"`weights` must be {count} finite non-negative numbers, got {list(raw_weights.tolist())}")

    finite = torch.isfinite(rows).all(dim=1)
    dropped = tuple(int(i) for i in torch.nonzero(~finite).flatten())
    keep = finite & (raw_weights > 0)
    if not bool(keep.any()):
        keep = finite  # every finite input has zero weight (peers tagging along): average them equally
        raw_weights = torch.ones(count, dtype=torch.float64)
    if not bool(keep.any()):
        empty = torch.zeros(shape, dtype=dtype)
        return ClipResult(empty, float(tau or 0.0), 0, dropped, (), tuple(math.inf for _ in range(count)))

    kept_rows = rows[keep]
    kept_weights = raw_weights[keep]
    kept_weights = torch.clamp(kept_weights, max=float(kept_weights.median())).to(rows.dtype)
    kept_weights = kept_weights / kept_weights.sum()

    estimate = coordinate_median(kept_rows)
    radius = float(tau) if tau is not None else float((kept_rows - estimate).norm(dim=1).median())
    estimate, steps = _clip_iterations(kept_rows, kept_weights, estimate, radius, iterations, tolerance)
    rejected: tuple[int, ...] = ()
    if drop_factor is not None and radius > 0:
        distances = (kept_rows - estimate).norm(dim=1)
        far = torch.nonzero(distances > drop_factor * radius).flatten()
        far = far[distances[far].argsort(descending=True)][: (len(kept_rows) - 1) // 2]  # never a majority
        if len(far):
            kept_indices = torch.nonzero(keep).flatten()
            rejected = tuple(sorted(int(kept_indices[i]) for i in far))
            remaining = torch.ones(len(kept_rows), dtype=torch.bool)
            remaining[far] = False
            keep[kept_indices[far]] = False
            kept_rows = kept_rows[remaining]
            kept_weights = kept_weights[remaining] / kept_weights[remaining].sum()
            # continue from the clipped result: the rejected vectors' residual pull (at most ~τ/n) is undone
            estimate, more = _clip_iterations(kept_rows, kept_weights, estimate, radius, iterations, tolerance)
            steps += more

    all_distances = torch.full((count,), math.inf, dtype=torch.float64)
    all_distances[keep] = (kept_rows - estimate).norm(dim=1).to(torch.float64)
    for index in rejected:
        all_distances[index] = float((rows[index] - estimate).norm())
    clipped = tuple(int(i) for i in torch.nonzero(keep & (all_distances > radius)).flatten()) if radius > 0 else ()
    return ClipResult(
        value=estimate.reshape(shape).to(dtype),
        tau=radius,
        iterations=steps,
        dropped=dropped,
        clipped=clipped,
        distances=tuple(float(d) for d in all_distances),
        rejected=rejected,
    )


def _clip_iterations(rows: torch.Tensor, weights: torch.Tensor, estimate: torch.Tensor, radius: float,
                     iterations: int, tolerance: float) -> tuple[torch.Tensor, int]:  # fmt: skip
    """Up to ``iterations`` CenteredClip steps from ``estimate`` (weights sum to 1); returns it and the steps taken."""
    steps = 0
    while radius > 0 and steps < iterations:
        steps += 1
        differences = rows - estimate
        distances = differences.norm(dim=1)
        scale = torch.clamp(radius / distances.clamp_min(torch.finfo(rows.dtype).tiny), max=1.0)
        step = (weights * scale) @ differences
        estimate = estimate + step
        if float(step.norm()) < tolerance * radius:
            break
    return estimate, steps
