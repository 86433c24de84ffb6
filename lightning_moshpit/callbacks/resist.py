"""``ResIST``: every peer trains a random shallow sub-ResNet, and each residual block is averaged among its holders.

ResIST (Dun et al., "ResIST: Layer-Wise Decomposition of ResNets for Distributed Training", UAI 2022) cuts the
compute, memory and communication of local SGD for ResNets:

- **Partitioning.** The non-downsampling residual blocks of the chosen stages (by default the long third stage) are
  *partitionable*. Every ``local_steps`` batches a fresh random permutation of them is split round-robin into S
  sub-networks; with ``min_blocks``, a sub-network with fewer blocks gets extra random ones, so sub-networks overlap.
  The stem, every strided or downsampling block, the other stages (the last one included) and the head are in
  every sub-network. A block outside this peer's sub-network is skipped: it acts as the identity, so the peer's
  forward and backward passes are shorter.
- **Aggregation.** Each partitioned block is averaged over the peers that trained it this round, shared parts over
  everybody; a block nobody trained keeps its value. The optimizer is re-created (its momentum reset) at each
  repartition.
- **Evaluation.** All blocks are active, and each partitioned block's residual branch is scaled by 1/S (as dropout
  rescales at test time): a block was trained in about 1/S of the rounds.

How peers without ranks agree on the partition, and how averaging is holder-weighted and sends only held parts, is
in :mod:`lightning_moshpit.callbacks.subnets` and :mod:`lightning_moshpit.holder_averaging`; docs/resist.md has the
design and the measurements.

**Which models.** Blocks are found in ``layer1..layer4`` (torchvision and timm ResNets, ResNeXt, SE-ResNets, and any
model laid out the same way) or in ``stages[i].blocks`` / ``stages[i]`` (timm's ResNetV2 family). A block is
non-downsampling when it has no ``downsample`` module and no strided convolution. Other models name their blocks with
``blocks=``: a list of module paths, or a function ``(name, module) -> bool``.

The residual branch is scaled at evaluation as follows: timm and torchvision ResNet blocks through the last module of
their branch (``drop_path``, ``se`` or the last batch norm), and any other block by assuming it computes ``x + F(x)``
(pre-activation form, e.g. timm's ResNetV2): ``x + (block(x) - x) / S``.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from lightning_moshpit.callbacks.subnets import SubnetTraining, check_count, round_seed
from lightning_moshpit.holder_averaging import HolderMasks

#: ``blocks=`` may be module paths or a selector ``(qualified name, module) -> bool``.
BlockSelector = Union[Sequence[str], Callable[[str, nn.Module], bool]]


@dataclasses.dataclass
class ResidualBlock:
    """One partitionable block: where it is, and how its residual branch is scaled at evaluation."""

    path: str  #: qualified module name, e.g. ``"layer3.2"``
    module: nn.Module
    branch_end: Optional[nn.Module]  #: module whose output ends the residual branch (None: ``x + F(x)`` form)


def _strided(module: nn.Module) -> bool:
    return any(
        isinstance(m, nn.modules.conv._ConvNd) and any(s != 1 for s in m.stride) for m in module.modules()
    )


def _is_downsampling(block: nn.Module) -> bool:
    return getattr(block, "downsample", None) is not None or _strided(block)


def _stage_container(model: nn.Module, stage: int) -> Optional[nn.Module]:
    """Stage ``stage`` (1-based) of a torchvision/timm ResNet (``layerN``) or a timm ResNetV2 (``stages[N-1]``)."""
    layer = getattr(model, f"layer{stage}", None)
    if isinstance(layer, nn.Module):
        return layer
    stages = getattr(model, "stages", None)
    if isinstance(stages, (nn.Sequential, nn.ModuleList)) and 0 < stage <= len(stages):
        found = stages[stage - 1]
        return getattr(found, "blocks", found)
    return None


def _branch_end(block: nn.Module) -> Optional[nn.Module]:
    """The module whose output ends the residual branch, for the post-activation blocks whose forward we know.

    timm's and torchvision's ResNet blocks compute ``act(shortcut + branch)``; the branch ends in ``drop_path`` (timm,
    when set), else the squeeze-excite module ``se`` (timm, when set), else the last batch norm (``bn3`` in
    bottlenecks, ``bn2`` in basic blocks). Other blocks (timm's pre-activation ResNetV2 included) are treated as
    ``x + F(x)``.
    """
    origin = type(block).__module__
    if not (origin.startswith("timm.models.resnet") or origin.startswith("torchvision.models.resnet")):
        return None
    if origin.startswith("timm.models.resnetv2"):
        return None
    for name in ("drop_path", "se", "bn3", "bn2"):
        module = getattr(block, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


def find_residual_blocks(
    model: nn.Module, stages: Sequence[int] = (3,), blocks: Optional[BlockSelector] = None
) -> list[ResidualBlock]:
    """The partitionable blocks of ``model``: see the module docstring. Raises ``ValueError`` if there are none."""
    named = dict(model.named_modules())
    if blocks is not None:
        if callable(blocks):
            chosen = [(name, module) for name, module in named.items() if name and blocks(name, module)]
        elif isinstance(blocks, (list, tuple)) and all(isinstance(path, str) for path in blocks):
            missing = [path for path in blocks if path not in named]
            if missing:
                raise ValueError(f"`blocks` names modules that {type(model).__name__} does not have: {missing}")
            chosen = [(path, named[path]) for path in blocks]
        else:
            raise ValueError(f"`blocks` must be a list of module paths or a function (name, module) -> bool, "
                             f"got {type(blocks).__name__}")  # fmt: skip
        where = "the modules named by `blocks`"
    else:
        if not isinstance(stages, (list, tuple)) or not stages or not all(isinstance(s, int) for s in stages):
            raise ValueError(f"`stages` must be a non-empty list of stage numbers (1-based), got {stages!r}")
        names_by_id = {id(module): name for name, module in named.items()}
        chosen = []
        for stage in stages:
            # the model itself, or the first submodule laid out like a ResNet (a LightningModule wrapping a net)
            container = next((c for m in model.modules() if (c := _stage_container(m, stage)) is not None), None)
            if container is None:
                raise ValueError(
                    f"`stages` asks for stage {stage}, but {type(model).__name__} has no `layer{stage}` or "
                    f"`stages[{stage - 1}]`; name the blocks with `blocks=` (module paths or a selector function)"
                )
            chosen += [(names_by_id[id(block)], block) for block in container.children()]
        where = f"stage(s) {list(stages)}"
    found = [ResidualBlock(name, module, _branch_end(module)) for name, module in chosen if not _is_downsampling(module)]
    if not found:
        raise ValueError(
            f"No partitionable residual blocks found in {where} of {type(model).__name__}: ResIST partitions blocks "
            f"without a `downsample` module or strided convolution. Choose other `stages`, or name the blocks with "
            f"`blocks=`."
        )
    return found


def partition_blocks(num_blocks: int, num_subnets: int, min_blocks: int, seed: int) -> list[list[int]]:
    """ResIST's partition for one round: a random permutation of the blocks split round-robin into S sub-networks.

    With ``min_blocks``, a sub-network with fewer blocks gets random extra blocks from the others (sub-networks then
    overlap). Returns the sorted block indices of each sub-network. The same ``seed`` gives the same partition.
    """
    rng = random.Random(seed)
    order = list(range(num_blocks))
    rng.shuffle(order)
    subnets = [sorted(order[k::num_subnets]) for k in range(num_subnets)]
    for subnet in subnets:
        if len(subnet) < min_blocks:
            others = [b for b in range(num_blocks) if b not in subnet]
            subnet += rng.sample(others, min_blocks - len(subnet))
            subnet.sort()
    return subnets


class _Switch:
    """Replaces one block's ``forward``: identity when the block is off (training only), 1/S branch at evaluation."""

    def __init__(self, block: ResidualBlock, forward: Callable[..., Any]) -> None:
        self.block, self.forward = block, forward
        self.active = True
        self.scale = 1.0

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        module = self.block.module
        if module.training:
            return self.forward(x, *args, **kwargs) if self.active else x
        if self.scale == 1.0:
            return self.forward(x, *args, **kwargs)
        if self.block.branch_end is None:
            return x + (self.forward(x, *args, **kwargs) - x) * self.scale
        handle = self.block.branch_end.register_forward_hook(lambda _m, _i, out: out * self.scale)
        try:
            return self.forward(x, *args, **kwargs)
        finally:
            handle.remove()


class ResIST(SubnetTraining):
    """Train a ResNet as S random sub-ResNets, one per peer per round, each block averaged among its holders.

    See the module docstring for the method. Works with ``Trainer(strategy=MoshpitStrategy(local_updates=True))``
    (the swarm case) and with any other strategy (a new sub-network every round, for tests or as a regulariser).

    Example::

        model = MyLightningModule(timm.create_model("resnet26", num_classes=10))
        strategy = MoshpitStrategy(local_updates=True, target_batch_size=..., run_id="resist_run")
        trainer = L.Trainer(strategy=strategy, callbacks=[ResIST(local_steps=50)])

    Args:
        num_subnets: S, the number of sub-networks. Default: the number of peers visible when training starts (1 in
            a single process, where it partitions nothing: set it there). More sub-networks: shallower, faster
            sub-networks and fewer bytes, but each block trains in fewer rounds.
        local_steps: Batches per round: the sub-network is redrawn (and, in a swarm, averaged) every this many
            batches. The paper uses 50. Fewer: more communication, less drift between peers.
        stages: Which stages (1-based) to partition; the default ``(3,)`` is ResIST's long third stage. Add
            stage 2 for more savings on shallow nets.
        min_blocks: Give every sub-network at least this many partitioned blocks (extra random ones overlap with
            other sub-networks). 0 keeps the sub-networks disjoint.
        blocks: Name the partitionable blocks yourself: module paths, or a function ``(name, module) -> bool``.
            Overrides ``stages``. Downsampling blocks are still left out.
        seed: Mixed into the partition seed of a single-process run (a swarm seeds by its ``run_id``).
        reset_optimizer: Re-create the optimizer state (momentum) at each repartition, as ResIST does. ``False``
            keeps it (with ``num_subnets=1`` this is plain local SGD, the benchmark's baseline).
    """

    kind = "resist"

    def __init__(
        self,
        num_subnets: Optional[int] = None,
        local_steps: int = 50,
        stages: Sequence[int] = (3,),
        min_blocks: int = 0,
        blocks: Optional[BlockSelector] = None,
        seed: int = 0,
        reset_optimizer: bool = True,
    ) -> None:
        super().__init__(num_subnets, local_steps, seed, reset_optimizer)
        self.stages = tuple(stages) if isinstance(stages, (list, tuple)) else stages
        self.min_blocks = check_count(min_blocks, "min_blocks", minimum=0)
        self.block_selector = blocks
        self.blocks: list[ResidualBlock] = []  #: the partitionable blocks found in the model
        self._switches: list[_Switch] = []
        self._owner: list[Optional[int]] = []  # per averaged tensor: index of its block, None if shared
        self._tensors: list[torch.Tensor] = []

    # ------------------------------------------------------------------------------------------ public helpers
    def attach(self, model: nn.Module) -> None:
        """Find the blocks of ``model`` and install the switches (``Trainer.fit`` does this; call it to use the
        callback's sub-networks without a Trainer, e.g. in tests)."""
        self._prepare(model)

    def set_subnet(self, blocks: Optional[Sequence[int]]) -> None:
        """Train with only these partitioned blocks (indices into :attr:`blocks`); ``None`` switches all on."""
        keep = set(range(len(self.blocks))) if blocks is None else set(blocks)
        for index, switch in enumerate(self._switches):
            switch.active = index in keep

    def subnet_blocks(self, round_index: int, subnet: int) -> list[int]:
        """The partitioned blocks of sub-network ``subnet`` in round ``round_index``."""
        return self._plan(round_index)[subnet]

    # ------------------------------------------------------------------------------------------ SubnetTraining
    def _prepare(self, model: torch.nn.Module) -> None:
        if self._switches:
            return
        self.blocks = find_residual_blocks(model, self.stages, self.block_selector)
        if self.min_blocks > len(self.blocks):
            raise ValueError(f"`min_blocks` ({self.min_blocks}) exceeds the {len(self.blocks)} partitionable blocks")
        for block in self.blocks:
            switch = _Switch(block, block.module.forward)
            block.module.forward = switch  # an instance attribute: state_dict keys and the class stay as they were
            self._switches.append(switch)
        owner_of = {}
        for index, block in enumerate(self.blocks):
            for tensor in list(block.module.parameters()) + list(block.module.buffers()):
                owner_of[id(tensor)] = index
        self._owner, self._tensors = [], []
        for tensor in list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]:
            self._owner.append(owner_of.get(id(tensor)))
            self._tensors.append(tensor)
        self._set_scale(1.0 / self.num_subnets)

    def _set_scale(self, scale: float) -> None:
        for switch in self._switches:
            switch.scale = scale

    def _plan(self, round_index: int) -> list[list[int]]:
        seed = round_seed(self._run_id, round_index)
        return partition_blocks(len(self.blocks), self.num_subnets, self.min_blocks, seed)

    def _activate(self, plan: list[list[int]], subnet: Optional[int]) -> None:
        self._set_scale(1.0 / self.num_subnets)
        self.set_subnet(None if subnet is None else plan[subnet])

    def _averaged_tensors(self) -> list[torch.Tensor]:
        return [tensor.detach().clone() for tensor in self._tensors]

    def _read(self, plan: Any, into: list[torch.Tensor]) -> None:
        for target, tensor in zip(into, self._tensors):
            target.copy_(tensor.detach())

    def _write(self, plan: Any, source: list[torch.Tensor], needs: frozenset[int]) -> None:
        for index in needs:
            self._tensors[index].data.copy_(source[index])

    def _indices(self, blocks: Optional[Sequence[int]]) -> frozenset[int]:
        keep = None if blocks is None else set(blocks)
        return frozenset(i for i, owner in enumerate(self._owner) if owner is None or keep is None or owner in keep)

    def _masks(self, plan: Any, subnet: int, next_plan: Optional[Any], next_subnet: Optional[int]) -> HolderMasks:
        needs = None if next_plan is None or next_subnet is None else next_plan[next_subnet]
        return HolderMasks(sends=self._indices(plan[subnet]), needs=self._indices(needs))


def remove_switches(model: nn.Module) -> None:
    """Undo :class:`ResIST`'s per-block ``forward`` overrides on ``model`` (all blocks plain again, no 1/S scaling)."""
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), _Switch):
            del module.__dict__["forward"]


__all__ = ["ResIST", "ResidualBlock", "find_residual_blocks", "partition_blocks", "remove_switches"]
