"""The SwAV method, in plain torch: projection head with prototypes, Sinkhorn-Knopp codes, the feature queue and the
swapped-prediction loss (Caron et al., "Unsupervised Learning of Visual Features by Contrasting Cluster
Assignments", NeurIPS 2020).

How SwAV learns without labels, in four lines:

1. Every image is cut into several *views* (multi-crop: 2 large and a few small crops, see ``multicrop.py``).
2. Each view goes through the backbone and a small MLP to a unit-length embedding ``z``; its scores against ``K``
   learnable unit-length *prototypes* are ``z @ C.T``.
3. For the large views only, the scores of the batch are turned into soft cluster assignments ("codes") ``q`` by
   a few Sinkhorn-Knopp iterations. The iterations force the batch to spread evenly over the prototypes, which is
   what keeps every image from collapsing onto the same cluster.
4. Every *other* view must predict that code from its own scores (cross-entropy with ``softmax(scores / T)``): the
   views of one image swap their assignments.

Two details make it work with small local batches, as each peer of a swarm has:

- **A queue** of embeddings from this peer's previous batches joins the batch in step 3 once it is full, so the
  equal-partition constraint is enforced over thousands of samples rather than a few dozen.
- **Frozen prototypes** for the first steps (their learning rate is zero, see ``train.py``), so the backbone first
  learns features the prototypes can then spread over.

SwAV's own code sums Sinkhorn's row and column totals over all GPUs with ``all_reduce``; a swarm has no such
collective, so each peer computes its codes from its own batch and queue (as DeDLOC's SwAV peers did). Nothing here
is specific to the swarm.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F


class SwAVHead(nn.Module):
    """Projection MLP (``Linear-BN-ReLU-Linear``) to a unit sphere, followed by bias-free prototypes.

    Args:
        in_features: Backbone feature size (2048 for a ResNet-50).
        hidden_dim: Width of the MLP's hidden layer (2048 in SwAV).
        output_dim: Embedding size ``z`` (128 in SwAV).
        num_prototypes: Number of prototypes ``K`` (3000 for ImageNet); a few times the number of classes you
            expect in the data.
    """

    def __init__(self, in_features: int, hidden_dim: int, output_dim: int, num_prototypes: int) -> None:
        super().__init__()
        self.projection = nn.Sequential(
            nn.Linear(in_features, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, output_dim),
        )
        self.prototypes = nn.Linear(output_dim, num_prototypes, bias=False)

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        """Project the prototypes back onto the unit sphere (SwAV does this before every forward pass)."""
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(embeddings, scores)``: unit-length embeddings and their dot products with every prototype."""
        embeddings = F.normalize(self.projection(features), dim=1)
        return embeddings, self.prototypes(embeddings)


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """Soft assignments of ``B`` samples to ``K`` prototypes that use every prototype about equally.

    Solves the entropy-regularised transport problem of SwAV's equation (3) approximately: start from
    ``exp(scores / epsilon)`` and rescale rows (prototypes) to ``1/K`` and columns (samples) to ``1/B`` in turn.

    Args:
        scores: ``(B, K)`` similarities between embeddings and prototypes (in ``[-1, 1]``).
        epsilon: Entropy weight: smaller gives sharper codes. SwAV uses 0.05 (0.03 in DeDLOC's config).
        iterations: Sinkhorn-Knopp iterations (3 in SwAV).

    Returns:
        ``(B, K)`` codes; every row sums to 1.
    """
    if epsilon <= 0:
        raise ValueError(f"`epsilon` must be positive, got {epsilon!r}")
    if iterations < 1:
        raise ValueError(f"`iterations` must be at least 1, got {iterations!r}")
    logits = scores.float() / epsilon
    q = torch.exp(logits - logits.max()).t()  # K x B; subtracting the max changes nothing after normalising
    num_prototypes, num_samples = q.shape
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True) * num_prototypes  # every prototype gets 1/K of the mass
        q /= q.sum(dim=0, keepdim=True) * num_samples  # every sample gets 1/B of the mass
    return (q * num_samples).t()


class FeatureQueue:
    """The last ``length`` embeddings of each assigned view, from this peer's previous batches (newest first).

    A plain tensor, not a module buffer, on purpose: ``MoshpitStrategy`` averages floating-point buffers across the
    swarm, and an average of different peers' embeddings is no sample at all. It is not saved in checkpoints either
    (SwAV refills it within ``length / batch_size`` steps). It takes part in Sinkhorn only once it is full.
    """

    def __init__(self, num_views: int, length: int, dim: int, device: Optional[torch.device] = None) -> None:
        if length < 1:
            raise ValueError(f"`length` must be at least 1, got {length!r}")
        self.embeddings = torch.zeros(num_views, length, dim, device=device)
        self.filled = 0

    @property
    def full(self) -> bool:
        return self.filled >= self.embeddings.shape[1]

    @torch.no_grad()
    def push(self, view: int, embeddings: torch.Tensor) -> None:
        """Put a batch of embeddings of view ``view`` at the front, dropping the oldest (a batch longer than the
        queue keeps its first ``length`` rows). Push every view once per batch, in order."""
        length = self.embeddings.shape[1]
        batch = embeddings.detach()[:length].to(self.embeddings)
        self.embeddings[view] = torch.cat([batch, self.embeddings[view, : length - len(batch)]])
        if view == self.embeddings.shape[0] - 1:
            self.filled = min(length, self.filled + len(batch))


def swav_loss(
    embeddings: torch.Tensor,
    scores: torch.Tensor,
    batch_size: int,
    assign_views: Sequence[int],
    prototypes: torch.Tensor,
    temperature: float = 0.1,
    epsilon: float = 0.05,
    sinkhorn_iterations: int = 3,
    queue: Optional[FeatureQueue] = None,
    use_queue: bool = False,
) -> torch.Tensor:
    """SwAV's swapped-prediction loss over all views of a batch.

    Args:
        embeddings: ``(V * B, D)`` embeddings of all views, view by view (view 0 of every image, then view 1, ...).
        scores: ``(V * B, K)`` their prototype scores.
        batch_size: ``B``, images in the batch.
        assign_views: Views whose codes are computed (SwAV: the two large crops, ``[0, 1]``).
        prototypes: ``(K, D)`` prototype weights (to score the queued embeddings).
        temperature: Softmax temperature of the predictions (0.1 in SwAV).
        epsilon, sinkhorn_iterations: See :func:`sinkhorn`.
        queue: Embeddings of previous batches; this batch's assigned embeddings are pushed into it.
        use_queue: Whether the queue takes part in Sinkhorn yet (it also has to be full).

    Returns:
        The loss, averaged over the assigned views and, for each, over the other views that predict its code.
    """
    num_views = scores.shape[0] // batch_size
    if num_views * batch_size != scores.shape[0] or num_views < 2:
        raise ValueError(f"scores have {scores.shape[0]} rows: not a multiple (at least 2) of batch_size={batch_size}")
    log_predictions = F.log_softmax(scores.float() / temperature, dim=1)
    total = scores.new_zeros((), dtype=torch.float32)
    for slot, view in enumerate(assign_views):
        rows = slice(view * batch_size, (view + 1) * batch_size)
        with torch.no_grad():
            view_scores = scores[rows].detach().float()
            if queue is not None:
                if use_queue and queue.full:
                    queued = queue.embeddings[slot].to(prototypes.dtype) @ prototypes.detach().t()
                    view_scores = torch.cat([queued.float(), view_scores])
                queue.push(slot, embeddings[rows])
            codes = sinkhorn(view_scores, epsilon, sinkhorn_iterations)[-batch_size:]
        others = [v for v in range(num_views) if v != view]
        view_loss = sum(
            -(codes * log_predictions[v * batch_size : (v + 1) * batch_size]).sum(dim=1).mean() for v in others
        )
        total = total + view_loss / len(others)
    return total / len(assign_views)
