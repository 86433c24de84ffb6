"""Guards that keep one peer's trouble out of the swarm: non-finite gradients and a model that does not fit.

Both are checks a peer runs on itself before it sends anything, so they need no trust in other peers (defending
against peers that *lie* is the job of Byzantine-tolerant aggregation, not of these guards):

- :func:`nonfinite_gradients` finds NaN/inf gradients after the backward pass. The peer then drops that batch instead
  of adding it to the gradients it will average with the swarm: one NaN in a mean makes every peer's update NaN.
- :class:`ModelSignature` summarises a model's parameter names, shapes and dtypes. A joiner compares it with the
  signatures the swarm published in the DHT and refuses to start with a clear error, instead of hivemind's silent
  shape mismatch while downloading state (which it retries forever).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Sequence
from typing import Any, Optional

import torch

#: Largest number of tensors whose shapes are published in full; bigger models publish only the hash and totals.
MAX_PUBLISHED_SHAPES = 512


def nonfinite_gradients(named_parameters: Iterable[tuple[str, torch.Tensor]]) -> Optional[str]:
    """Describe the parameters whose gradient holds NaN or inf, or return ``None`` when every gradient is finite.

    >>> weight = torch.nn.Parameter(torch.zeros(2)); weight.grad = torch.tensor([1.0, float("nan")])
    >>> nonfinite_gradients([("weight", weight)])
    'NaN gradient in 1 of 1 parameter tensor(s): weight'
    """
    bad: list[str] = []
    kinds: set[str] = set()
    total = 0
    for name, parameter in named_parameters:
        grad = parameter.grad
        if grad is None:
            continue
        total += 1
        if bool(torch.isfinite(grad).all()):
            continue
        bad.append(name)
        kinds.add("NaN" if bool(torch.isnan(grad).any()) else "inf")
    if not bad:
        return None
    shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    return f"{'/'.join(sorted(kinds))} gradient in {len(bad)} of {total} parameter tensor(s): {shown}"


@dataclasses.dataclass(frozen=True)
class ModelSignature:
    """What peers of one run must agree on: the names, shapes and dtypes of the tensors they average."""

    digest: str  #: sha256 over every (name, shape, dtype)
    num_tensors: int
    num_values: int
    shapes: Optional[tuple[tuple[str, tuple[int, ...]], ...]]  #: (name, shape) pairs; None for very large models

    @classmethod
    def of(cls, named_tensors: Sequence[tuple[str, torch.Tensor]]) -> "ModelSignature":
        entries = [(name, tuple(tensor.shape), str(tensor.dtype)) for name, tensor in named_tensors]
        digest = hashlib.sha256(repr(entries).encode()).hexdigest()[:16]
        shapes = tuple((name, shape) for name, shape, _ in entries) if len(entries) <= MAX_PUBLISHED_SHAPES else None
        return cls(digest, len(entries), sum(tensor.numel() for _, tensor in named_tensors), shapes)

    def to_record(self) -> dict[str, Any]:
        """A msgpack-friendly dict for the DHT."""
        shapes = [[name, list(shape)] for name, shape in self.shapes] if self.shapes is not None else None
        return {"digest": self.digest, "num_tensors": self.num_tensors, "num_values": self.num_values, "shapes": shapes}

    @classmethod
    def from_record(cls, record: Any) -> Optional["ModelSignature"]:
        """Parse a DHT record; ``None`` if it is malformed (records from other software are ignored, not trusted)."""
        try:
            shapes = record.get("shapes")
            parsed = tuple((str(name), tuple(int(n) for n in shape)) for name, shape in shapes) if shapes else None
            return cls(str(record["digest"]), int(record["num_tensors"]), int(record["num_values"]), parsed)
        except (AttributeError, KeyError, TypeError, ValueError):
            return None

    def mismatch(self, swarm: "ModelSignature") -> Optional[str]:
        """``None`` if the models match, else a sentence saying how this model differs from the swarm's."""
        if self.digest == swarm.digest:
            return None
        message = (
            f"this peer's model has {self.num_tensors} tensors with {self.num_values:,} values, the swarm's has "
            f"{swarm.num_tensors} tensors with {swarm.num_values:,} values"
        )
        if self.shapes is not None and swarm.shapes is not None:
            for index, (ours, theirs) in enumerate(zip(self.shapes, swarm.shapes)):
                if ours != theirs:
                    return f"{message}; first difference at tensor #{index}: {_show(ours)} here vs {_show(theirs)}"
            if len(self.shapes) != len(swarm.shapes):
                longer = self.shapes if len(self.shapes) > len(swarm.shapes) else swarm.shapes
                extra = longer[min(len(self.shapes), len(swarm.shapes))]
                where = "here" if longer is self.shapes else "in the swarm"
                return f"{message}; tensor {_show(extra)} exists only {where}"
        return f"{message} (or the same shapes with different dtypes)"


def _show(entry: tuple[str, tuple[int, ...]]) -> str:
    name, shape = entry
    return f"{name} {list(shape)}"
