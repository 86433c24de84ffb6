"""``IndependentSubnet`` (IST): every peer trains a random 1/S of each hidden layer's neurons of an MLP.

IST (Yuan et al., "Distributed Learning of Fully Connected Neural Networks using Independent Subnet Training", VLDB
2022): every ``local_steps`` batches the hidden neurons of each layer are split at random into S disjoint groups;
peer k trains only the neurons of group k, i.e. their rows (weights into them, and biases) and their columns (weights
out of them into the next layer's neurons of group k). Inputs and outputs are shared: the first layer's rows of
group k see every input feature, and the last layer's columns of group k feed every output, whose bias is shared.
Disjoint parts need no averaging, only reassembly: a round puts every group's rows and columns back into the full
matrices. (Peers that trained the same group average it; the output bias is averaged over everybody.)

**Training a part.** Neurons outside this peer's group are switched off by zeroing their activations where they
enter the next ``Linear`` (so their rows and columns get no gradient), and the kept ones are scaled by S, as inverted
dropout does: the full network, which sums S groups' contributions, then predicts like the mean of the sub-networks.
Evaluation uses every neuron with no scaling.

**Layers.** By default every ``nn.Linear`` of the model, in registration order, forms a chain (each layer's
``out_features`` is the next one's ``in_features``, activations in between); pass ``layers=`` (module paths) for
models with other Linear layers. Hidden neurons are the outputs of every chained layer but the last.

**In a swarm**, a round averages fixed-shape *slots*: for every layer and group k, the block of the weight matrix at
(rows of k, columns of k) and the bias entries of k, gathered with the round's random neuron order. Peers at the same
round (the round number travels with the masks) agree on what each slot holds; a peer at another round sits the
round out. Every peer needs every slot back (its next group is spread over all of this round's groups), so IST saves
bytes on the way up only; see docs/resist.md for the measured figures.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import nn

from lightning_moshpit.callbacks.subnets import SubnetTraining, round_seed
from lightning_moshpit.holder_averaging import HolderMasks


@dataclasses.dataclass
class NeuronPlan:
    """One round's partition: for each hidden layer, the neuron indices of each of the S groups."""

    groups: list[list[torch.Tensor]]  #: groups[h][k]: neurons of group k in hidden layer h (a LongTensor)


def partition_neurons(sizes: Sequence[int], num_subnets: int, seed: int) -> NeuronPlan:
    """Split each hidden layer's neurons into S disjoint random groups (a random permutation dealt round-robin)."""
    generator = torch.Generator().manual_seed(seed)
    groups = []
    for size in sizes:
        order = torch.randperm(size, generator=generator)
        groups.append([order[k::num_subnets].sort().values for k in range(num_subnets)])
    return NeuronPlan(groups)


def find_linear_chain(model: nn.Module, layers: Optional[Sequence[str]] = None) -> list[nn.Linear]:
    """The chained ``nn.Linear`` layers IST partitions (see the module docstring); ``ValueError`` if none fit."""
    named = dict(model.named_modules())
    if layers is not None:
        if not isinstance(layers, (list, tuple)) or not all(isinstance(path, str) for path in layers):
            raise ValueError(f"`layers` must be a list of module paths, got {layers!r}")
        missing = [path for path in layers if path not in named or not isinstance(named[path], nn.Linear)]
        if missing:
            raise ValueError(f"`layers` must name nn.Linear modules of {type(model).__name__}; not found: {missing}")
        chain = [named[path] for path in layers]
    else:
        chain = [module for module in model.modules() if isinstance(module, nn.Linear)]
    if len(chain) < 2:
        raise ValueError(
            f"IndependentSubnet needs at least two chained nn.Linear layers (one hidden layer) to partition; found "
            f"{len(chain)} in {type(model).__name__}"
        )
    for first, second in zip(chain, chain[1:]):
        if first.out_features != second.in_features:
            raise ValueError(
                f"IndependentSubnet: the Linear layers do not form a chain ({first.out_features} outputs feed a layer "
                f"with {second.in_features} inputs); name the chain with `layers=`"
            )
    return chain


class IndependentSubnet(SubnetTraining):
    """Independent Subnet Training for MLPs: each peer trains one of S disjoint neuron groups per round.

    See the module docstring. Works in a swarm (``MoshpitStrategy(local_updates=True)``) and in a single process.

    Args:
        num_subnets: S, the number of neuron groups. Default: the number of peers visible when training starts.
        local_steps: Batches per round (new groups, and in a swarm a reassembly round, every this many batches).
        layers: Module paths of the chained ``nn.Linear`` layers; default: every Linear of the model, in order.
        seed: Mixed into the partition seed of a single-process run (a swarm seeds by its ``run_id``).
        reset_optimizer: Reset the optimizer state (momentum) at each repartition.
    """

    kind = "ist"

    def __init__(
        self,
        num_subnets: Optional[int] = None,
        local_steps: int = 50,
        layers: Optional[Sequence[str]] = None,
        seed: int = 0,
        reset_optimizer: bool = True,
    ) -> None:
        super().__init__(num_subnets, local_steps, seed, reset_optimizer)
        self.layer_paths = layers
        self.layers: list[nn.Linear] = []  #: the chained layers
        self._masks_by_hidden: list[Optional[torch.Tensor]] = []
        self._handles: list[Any] = []
        self._slots: list[tuple[int, str, int]] = []  # per averaged tensor: (layer, "weight"|"bias", group or -1)

    # ------------------------------------------------------------------------------------------ public helpers
    def attach(self, model: nn.Module) -> None:
        """Find the layers of ``model`` and install the neuron masks (``Trainer.fit`` does this)."""
        self._prepare(model)

    def plan(self, round_index: int) -> NeuronPlan:
        """The neuron groups of round ``round_index``."""
        return self._plan(round_index)

    def gather(self, plan: NeuronPlan) -> list[torch.Tensor]:
        """The slots of ``plan`` (what a swarm round averages), copied out of the model."""
        slots = self._averaged_tensors()
        self._read(plan, slots)
        return slots

    def scatter(self, plan: NeuronPlan, slots: Sequence[torch.Tensor]) -> None:
        """Put slots laid out for ``plan`` back into the model (the reassembly)."""
        with torch.no_grad():
            self._write(plan, list(slots), frozenset(range(len(slots))))

    # ------------------------------------------------------------------------------------------ SubnetTraining
    def _prepare(self, model: torch.nn.Module) -> None:
        if self.layers:
            return
        self.layers = find_linear_chain(model, self.layer_paths)
        self._masks_by_hidden = [None] * (len(self.layers) - 1)
        for hidden, consumer in enumerate(self.layers[1:]):
            self._handles.append(consumer.register_forward_pre_hook(self._masking_hook(hidden)))

    def _masking_hook(self, hidden: int) -> Any:
        def hook(module: nn.Module, args: tuple) -> Optional[tuple]:
            mask = self._masks_by_hidden[hidden]
            if not module.training or mask is None:
                return None
            return (args[0] * mask.to(args[0].dtype), *args[1:])

        return hook

    @property
    def _hidden_sizes(self) -> list[int]:
        return [layer.out_features for layer in self.layers[:-1]]

    def _plan(self, round_index: int) -> NeuronPlan:
        return partition_neurons(self._hidden_sizes, self.num_subnets, round_seed(self._run_id, round_index))

    def _activate(self, plan: NeuronPlan, subnet: Optional[int]) -> None:
        for hidden, size in enumerate(self._hidden_sizes):
            if subnet is None or self.num_subnets == 1:
                self._masks_by_hidden[hidden] = None
                continue
            mask = torch.zeros(size, device=self.layers[hidden].weight.device)
            mask[plan.groups[hidden][subnet]] = float(self.num_subnets)
            self._masks_by_hidden[hidden] = mask

    def _rows_cols(self, plan: NeuronPlan, layer: int, group: int) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        rows = plan.groups[layer][group] if layer < len(self.layers) - 1 else None
        cols = plan.groups[layer - 1][group] if layer > 0 else None
        return rows, cols

    def _averaged_tensors(self) -> list[torch.Tensor]:
        plan = self._plan(0)  # slot shapes are the same every round
        self._slots, tensors = [], []
        for index, layer in enumerate(self.layers):
            for group in range(self.num_subnets):
                rows, cols = self._rows_cols(plan, index, group)
                out = layer.out_features if rows is None else len(rows)
                inp = layer.in_features if cols is None else len(cols)
                self._slots.append((index, "weight", group))
                tensors.append(torch.zeros(out, inp))
                if layer.bias is not None and rows is not None:
                    self._slots.append((index, "bias", group))
                    tensors.append(torch.zeros(out))
            if layer.bias is not None and index == len(self.layers) - 1:
                self._slots.append((index, "bias", -1))  # the output bias: shared by every group
                tensors.append(torch.zeros(layer.out_features))
        return tensors

    def _view(self, plan: NeuronPlan, slot: tuple[int, str, int]) -> tuple[torch.Tensor, Any]:
        """The parameter a slot comes from, and the index that selects the slot's entries."""
        index, name, group = slot
        layer = self.layers[index]
        if name == "bias":
            rows = None if group < 0 else self._rows_cols(plan, index, group)[0]
            return layer.bias, (slice(None) if rows is None else rows,)
        rows, cols = self._rows_cols(plan, index, group)
        if rows is not None and cols is not None:
            return layer.weight, (rows[:, None], cols[None, :])
        if rows is not None:
            return layer.weight, (rows,)
        return layer.weight, (slice(None), cols)

    def _read(self, plan: Any, into: list[torch.Tensor]) -> None:
        for target, slot in zip(into, self._slots):
            parameter, where = self._view(plan, slot)
            target.copy_(parameter.detach()[where])

    def _write(self, plan: Any, source: list[torch.Tensor], needs: frozenset[int]) -> None:
        for position, slot in enumerate(self._slots):
            if position in needs:
                parameter, where = self._view(plan, slot)
                parameter.data[where] = source[position].to(parameter.dtype)

    def _masks(self, plan: Any, subnet: int, next_plan: Optional[Any], next_subnet: Optional[int]) -> HolderMasks:
        if not self._slots:
            self._averaged_tensors()  # lays out the slots
        sends = frozenset(i for i, (_, _, group) in enumerate(self._slots) if group in (subnet, -1))
        return HolderMasks(sends=sends, needs=frozenset(range(len(self._slots))), round=self.round)
